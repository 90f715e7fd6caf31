//! Structured values from fuzz bytes: strings made of pieces that matter to the parsers (dots,
//! slashes, percent escapes, brackets, control characters) mixed with arbitrary characters.

use arbitrary::{Result, Unstructured};

/// Up to `max` pieces, each one of `pieces` or (one in four) an arbitrary character.
pub(crate) fn text(u: &mut Unstructured<'_>, pieces: &[&str], max: usize) -> Result<String> {
    let n = u.int_in_range(0..=max)?;
    let mut out = String::new();
    for _ in 0..n {
        if u.ratio(1, 4)? {
            out.push(u.arbitrary::<char>()?);
        } else {
            out.push_str(u.choose(pieces)?);
        }
    }
    Ok(out)
}

/// [`text`], or nothing.
pub(crate) fn maybe_text(
    u: &mut Unstructured<'_>,
    pieces: &[&str],
    max: usize,
) -> Result<Option<String>> {
    Ok(if u.arbitrary()? {
        Some(text(u, pieces, max)?)
    } else {
        None
    })
}

/// Up to `max` bytes.
pub(crate) fn bytes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?;
    Ok(u.bytes(n.min(u.len()))?.to_vec())
}

/// Up to `max` items made by `item`.
pub(crate) fn list<T>(
    u: &mut Unstructured<'_>,
    max: usize,
    mut item: impl FnMut(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| item(u)).collect()
}

/// Header names and values: tokens, separators and what would break a header line.
pub(crate) const HEADER_PIECES: &[&str] = &[
    "x-",
    "a",
    "Z",
    "-",
    "_",
    "content-type",
    "Content-Length",
    "host",
    "x-call-id",
    "X-Retry",
    "connection",
    "transfer-encoding",
    "x-forwarded-",
    "set-cookie",
    "access-control-",
    ":",
    " ",
    "\t",
    "\r",
    "\n",
    "\r\n",
    "\0",
    "\u{7f}",
    "é",
    "=",
    ";",
    ",",
    "\"",
    "text/plain",
    "charset=",
];
