//! The queued-call envelope: `FAQC`, a version byte, a big-endian `u32` metadata length, the
//! metadata JSON, the raw body. Written by the gateway, read by every worker (and by hand-made
//! or replayed messages): the compatibility and trust boundary between the binaries.
//!
//! Properties:
//! - arbitrary bytes decode to a valid call or to the error of the first part that is wrong
//!   (short, magic, metadata length); never a panic, never a body that is not the input's tail;
//! - a decoded call re-encodes to an envelope that decodes to the same call;
//! - any call encodes to `encoded_len` bytes and decodes to itself when it is valid, or is
//!   refused with exactly the error `validate` gives; every proper prefix of an envelope is
//!   refused with the error of the part it cuts;
//! - sealed (version 2, a fixed test key): arbitrary bytes open to a valid call or an error,
//!   and their keyless summary agrees; a valid call sealed opens to itself, never without the
//!   key, and no proper prefix of it opens.

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use queue_core::blobs::BlobRef;
use queue_core::message::{
    BodyLocation, CallMeta, CallOverrides, DecodeError, EnvelopeSummary, FORMAT_VERSION, MAGIC,
    METHODS, QueuedCall,
};

use queue_core::sealing::{Keyring, Sealing};

use crate::generate::{HEADER_PIECES, bytes, list, maybe_text, text};
use crate::must;

/// Magic, version and metadata length (the module docs of `queue_core::message`).
const HEADER_LEN: usize = 4 + 1 + 4;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    decode_any(data);
    open_any(data);
    if let Ok((call, cut)) = call_and_cut(&mut Unstructured::new(data)) {
        round_trip(&call, cut);
        sealed_round_trip(&call, cut);
    }
}

/// The keys of the sealed (version 2) properties: a fixed test key.
fn sealing() -> Sealing {
    static SEALING: std::sync::OnceLock<Sealing> = std::sync::OnceLock::new();
    SEALING
        .get_or_init(|| {
            Sealing::with_keys(must(
                Keyring::parse(
                    "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                    "fuzz keys",
                ),
                "the fuzz key parses",
            ))
        })
        .clone()
}

/// Arbitrary bytes opened with keys: a valid call, or an error; never a panic. The summary
/// (read without keys) never panics either, and agrees with an opened call.
fn open_any(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    let opened = QueuedCall::open(&payload, &sealing());
    let summary = EnvelopeSummary::of(&payload);
    if let Ok(call) = opened {
        assert_eq!(call.validate(), Ok(()));
        let summary = must(summary, "an envelope that opens has a summary");
        assert_eq!(summary.call_id, call.meta.call_id);
        assert_eq!(summary.function, call.meta.qualified_function());
    }
}

/// A valid call sealed opens to itself with the keys, never without them, and no proper
/// prefix of it opens.
fn sealed_round_trip(call: &QueuedCall, cut: usize) {
    if call.validate().is_err() {
        return;
    }
    let sealed = must(call.encode_with(&sealing()), "a call seals");
    let expected = as_encoded(call);
    assert_eq!(
        must(QueuedCall::open(&sealed, &sealing()), "a sealed call opens"),
        expected
    );
    assert!(matches!(
        QueuedCall::decode(&sealed),
        Err(DecodeError::Sealed(_))
    ));
    let cut = cut % sealed.len();
    assert!(QueuedCall::open(&sealed.slice(..cut), &sealing()).is_err());
}

fn decode_any(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    match QueuedCall::decode(&payload) {
        Ok(call) => {
            assert_eq!(call.validate(), Ok(()), "a decoded call is valid");
            assert!(data.ends_with(&call.body), "the body is the input's tail");
            match &call.meta.body {
                BodyLocation::Inline { len } => assert_eq!(*len, call.body.len() as u64),
                BodyLocation::Blob(_) => assert!(call.body.is_empty(), "a stored body"),
            }
            let again = must(call.encode(), "a decoded call encodes");
            assert_eq!(
                must(QueuedCall::decode(&again), "a re-encoded call decodes"),
                call
            );
        }
        Err(e) => check_refusal(data, &e),
    }
}

/// The refusal of `data` names the first part of the envelope that is wrong.
fn check_refusal(data: &[u8], e: &DecodeError) {
    if data.len() < HEADER_LEN {
        assert!(
            matches!(e, DecodeError::TooShort(n) if *n == data.len()),
            "{e}"
        );
        return;
    }
    if data[..4] != MAGIC {
        assert!(matches!(e, DecodeError::BadMagic), "{e}");
        return;
    }
    if let DecodeError::UnsupportedVersion(v) = e {
        assert_eq!(*v, data[4]);
    }
    if data[4] != FORMAT_VERSION {
        return;
    }
    assert!(!matches!(e, DecodeError::UnsupportedVersion(_)), "{e}");
    let meta_len = u32::from_be_bytes([data[5], data[6], data[7], data[8]]) as usize;
    if HEADER_LEN + meta_len > data.len() {
        assert!(
            matches!(e, DecodeError::MetadataLength(n) if *n == meta_len),
            "{e}"
        );
    } else {
        assert!(
            matches!(
                e,
                DecodeError::Metadata(_) | DecodeError::BodyLength { .. } | DecodeError::Invalid(_)
            ),
            "{e}"
        );
    }
}

/// The call as its envelope carries it: an inline body's length written in, a stored body's
/// reference kept.
fn as_encoded(call: &QueuedCall) -> QueuedCall {
    let mut expected = call.clone();
    if !call.meta.body.is_blob() {
        expected.meta.body = BodyLocation::Inline {
            len: call.body.len() as u64,
        };
    }
    expected
}

fn round_trip(call: &QueuedCall, cut: usize) {
    let encoded = must(call.encode(), "a call encodes");
    assert_eq!(encoded.len(), must(call.encoded_len(), "encoded_len"));
    let expected = as_encoded(call);
    match (call.validate(), QueuedCall::decode(&encoded)) {
        (Ok(()), Ok(decoded)) => assert_eq!(decoded, expected),
        (Err(invalid), Err(DecodeError::Invalid(refused))) => assert_eq!(invalid, refused),
        (valid, decoded) => panic!("validate gave {valid:?} but decode {decoded:?}"),
    }

    // A proper prefix (a truncated message) is never a call.
    let cut = cut % encoded.len();
    let meta_len = encoded.len() - HEADER_LEN - call.body.len();
    match QueuedCall::decode(&encoded.slice(..cut)) {
        Ok(decoded) => panic!("a {cut}-byte prefix decoded: {decoded:?}"),
        Err(DecodeError::TooShort(n)) => assert!(cut < HEADER_LEN && n == cut),
        Err(DecodeError::MetadataLength(n)) => {
            assert!(cut >= HEADER_LEN && cut < HEADER_LEN + meta_len && n == meta_len);
        }
        Err(DecodeError::BodyLength { declared, actual }) => {
            assert!(cut >= HEADER_LEN + meta_len);
            assert_eq!(declared, call.body.len() as u64);
            assert_eq!(actual, cut - HEADER_LEN - meta_len);
        }
        // A stored body with bytes inline too (an invalid call): a prefix past the metadata
        // is refused as that call is.
        Err(DecodeError::Invalid(_)) if call.meta.body.is_blob() => {
            assert!(cut >= HEADER_LEN + meta_len);
        }
        Err(e) => panic!("a {cut}-byte prefix refused as {e}"),
    }
}

const BLOB_KEY_PIECES: &[&str] = &[
    "0192a7c4", "job_42", "_2F", ".request", ".result", "/", "..",
];
const DIGEST_PIECES: &[&str] = &["ab", "0123456789abcdef0123456789abcdef", "AB", "g", ""];
const ID_PIECES: &[&str] = &[
    "0192a7c4", "-", "_", "job", "42", "a", "Z", ".", "/", " ", "%",
];
const NAME_PIECES: &[&str] = &[
    "fn", "Billing", "-", "_", "a", "9", ".", "/", "%2e", " ", "é",
];
const PATH_PIECES: &[&str] = &[
    "/", "a", "..", ".", "%2e", "%2E", "%2f", "%5C", "\\", " ", "\n", "?", "#", "%20", "é",
];
const URL_PIECES: &[&str] = &[
    "http://",
    "https://",
    "ftp://",
    "127.0.0.1",
    "[::1]",
    "example.com",
    ":8080",
    "/cb",
    "@",
    "?x=1",
    "%",
    "\\",
    " ",
];

fn call_and_cut(u: &mut Unstructured<'_>) -> Result<(QueuedCall, usize)> {
    let meta = CallMeta {
        call_id: text(u, ID_PIECES, 12)?,
        function: text(u, NAME_PIECES, 6)?,
        namespace: maybe_text(u, NAME_PIECES, 4)?,
        method: if u.ratio(7, 8)? {
            (*u.choose(&METHODS)?).to_owned()
        } else {
            text(u, &["CONNECT", "post", "GET ", "TRACE", "\r\n"], 2)?
        },
        path: text(u, PATH_PIECES, 8)?,
        query: maybe_text(u, &["a=1", "&", "%20", "=", "#", "\0"], 4)?,
        headers: list(u, 4, |u| {
            Ok((text(u, HEADER_PIECES, 3)?, text(u, HEADER_PIECES, 4)?))
        })?,
        callback_url: maybe_text(u, URL_PIECES, 6)?,
        received_at_unix_nanos: u.arbitrary()?,
        body: if u.ratio(1, 4)? {
            BodyLocation::Blob(BlobRef {
                key: text(u, BLOB_KEY_PIECES, 4)?,
                len: u.arbitrary()?,
                sha256: text(u, DIGEST_PIECES, 3)?,
            })
        } else {
            BodyLocation::Inline {
                len: u.arbitrary()?,
            }
        },
        record_revision: u.arbitrary()?,
        overrides: CallOverrides {
            max_retries: u.arbitrary()?,
            timeout_ms: u.arbitrary()?,
            max_age_ms: u.arbitrary()?,
            priority: match u.int_in_range(0..=3u8)? {
                0 => None,
                n => queue_core::message::Priority::ALL
                    .get(usize::from(n - 1))
                    .copied(),
            },
        },
        not_before_unix_nanos: u.arbitrary()?,
    };
    let cut = u.arbitrary()?;
    let body = Bytes::from(bytes(u, 64)?);
    Ok((QueuedCall { meta, body }, cut))
}

/// Valid envelopes: with and without namespace, query, headers, callback, revision, body.
pub fn seeds() -> Vec<Vec<u8>> {
    let full = QueuedCall {
        meta: CallMeta {
            call_id: "0192a7c4-1b2c-7d3e-8f40-123456789abc".into(),
            function: "figlet".into(),
            namespace: Some("team-a".into()),
            method: "POST".into(),
            path: "/render/x".into(),
            query: Some("a=1&b=%20".into()),
            headers: vec![
                ("content-type".into(), "text/plain".into()),
                ("x-multi".into(), "1".into()),
                ("x-multi".into(), "2".into()),
            ],
            callback_url: Some("http://127.0.0.1:9/cb".into()),
            received_at_unix_nanos: 1_700_000_000_000_000_000,
            body: BodyLocation::Inline { len: 0 },
            record_revision: Some(7),
            overrides: CallOverrides {
                max_retries: Some(2),
                timeout_ms: Some(90_000),
                max_age_ms: None,
                priority: Some(queue_core::message::Priority::High),
            },
            not_before_unix_nanos: None,
        },
        body: Bytes::from_static(b"\x00\xffbinary body"),
    };
    let bare = QueuedCall {
        meta: CallMeta {
            call_id: "job_42".into(),
            function: "f".into(),
            namespace: None,
            method: "GET".into(),
            path: String::new(),
            query: None,
            headers: Vec::new(),
            callback_url: None,
            received_at_unix_nanos: 0,
            body: BodyLocation::Inline { len: 0 },
            record_revision: None,
            overrides: CallOverrides::default(),
            not_before_unix_nanos: None,
        },
        body: Bytes::new(),
    };
    let mut hooked = bare.clone();
    hooked.meta.callback_url = Some("https://hooks.example.com/a?b=c".into());
    hooked.meta.method = "DELETE".into();
    hooked.meta.path = "/".into();
    let mut stored = bare.clone();
    stored.meta.body = BodyLocation::Blob(BlobRef {
        key: "job_5F42.request".into(),
        len: 300 << 20,
        sha256: "0123456789abcdef".repeat(4),
    });
    [full, bare, hooked, stored]
        .iter()
        .map(|call| must(call.encode(), "a seed encodes").to_vec())
        .collect()
}
