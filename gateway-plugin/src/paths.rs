//! The async route's path: `/async-function/{name}{rest}`, split where the router and the
//! authorization layer both need it.

/// The prefix of the async routes.
pub const ASYNC_PREFIX: &str = "/async-function/";

/// Splits `/async-function/{name}{rest}` from the raw (still percent-encoded) path.
pub fn split_path(raw: &str) -> (&str, &str) {
    let rest = raw.strip_prefix(ASYNC_PREFIX).unwrap_or(raw);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_separates_function_and_rest() {
        assert_eq!(split_path("/async-function/fn"), ("fn", ""));
        assert_eq!(split_path("/async-function/fn/"), ("fn", "/"));
        assert_eq!(split_path("/async-function/fn.ns/a/b"), ("fn.ns", "/a/b"));
    }
}
