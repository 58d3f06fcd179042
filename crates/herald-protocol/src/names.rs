//! What a valid room name and user id look like.
//!
//! Both appear in URLs (`/ws/ROOM`, `?rooms=a,b`), in Redis keys and in log lines, so they are
//! kept to a conservative alphabet: no whitespace, no control characters, no comma (the list
//! separator in `?rooms=`), at most [`MAX_NAME_BYTES`] bytes.

/// Longest room name or user id, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Why a name was refused, phrased to follow the field name in an error message.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("is longer than 128 bytes");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err("must not contain whitespace, control characters or commas");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass() {
        for name in ["lobby", "team:42", "user@example.com", "файл", "a/b"] {
            assert_eq!(check_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn empty_long_and_spaced_names_fail() {
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("a,b").is_err());
        assert!(check_name("a\nb").is_err());
    }
}
