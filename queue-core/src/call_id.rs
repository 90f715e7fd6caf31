//! What a call id may be: the one rule the message format, the records and the blob store
//! share (a leaf: it imports nothing of the crate).

/// Longest call id we accept (client-supplied ids included).
pub const MAX_CALL_ID_LEN: usize = 128;

/// Is this an acceptable call id (client-supplied or generated)? 1 to [`MAX_CALL_ID_LEN`]
/// visible ASCII characters (`!` to `~`, no space): any such id a client sends, as OpenFaaS
/// would pass it through, is kept exactly (stores that restrict their keys use
/// [`crate::records::store_key`]); anything else is refused, never replaced.
pub fn valid_call_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CALL_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}
