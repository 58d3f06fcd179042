//! What a valid room name and user id look like.
//!
//! Both appear in URLs (`/ws/ROOM`, `?rooms=a,b`), in Redis keys and in log lines, so they are
//! kept to a conservative alphabet: no whitespace, no control characters, no comma (the list
//! separator in `?rooms=`), at most [`MAX_NAME_BYTES`] bytes.
//!
//! Both are also shown to people, so a name may not hold characters that display as nothing
//! or rearrange the text around them: `alice\u{200B}` (a zero-width space) would look exactly
//! like `alice`, and a right-to-left override can make `evil\u{202E}gnp.exe` read as
//! `evilexe.png`. Refused are the Unicode properties Default_Ignorable_Code_Point (zero-width
//! characters, joiners, variation selectors, soft hyphen, invisible operators, …) and
//! Bidi_Control (embeddings, overrides, isolates, marks), and every other format character
//! (general category Cf), read from ICU4X's Unicode data rather than a table kept here.

use icu_properties::props::{BidiControl, DefaultIgnorableCodePoint, GeneralCategory};
use icu_properties::{CodePointMapData, CodePointSetData};

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
    if name.chars().any(is_invisible) {
        return Err(
            "must not contain invisible or direction-changing characters (such as U+200B or U+202E)",
        );
    }
    Ok(())
}

/// Whether `c` displays as nothing or changes the direction of the text around it.
fn is_invisible(c: char) -> bool {
    // ASCII has none of these; most names are ASCII.
    !c.is_ascii()
        && (CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
            || CodePointSetData::new::<BidiControl>().contains(c)
            || CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass() {
        for name in [
            "lobby",
            "team:42",
            "user@example.com",
            "файл",
            "a/b",
            "東京",
            "café",
        ] {
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

    #[test]
    fn zero_width_and_direction_changing_characters_fail() {
        for c in [
            '\u{200B}',  // zero-width space
            '\u{200C}',  // zero-width non-joiner
            '\u{200D}',  // zero-width joiner
            '\u{2060}',  // word joiner
            '\u{FEFF}',  // zero-width no-break space
            '\u{00AD}',  // soft hyphen
            '\u{034F}',  // combining grapheme joiner
            '\u{FE0F}',  // variation selector 16
            '\u{202E}',  // right-to-left override
            '\u{202A}',  // left-to-right embedding
            '\u{2066}',  // left-to-right isolate
            '\u{200F}',  // right-to-left mark
            '\u{061C}',  // Arabic letter mark
            '\u{E0041}', // tag latin capital A
            '\u{FFF9}',  // interlinear annotation anchor
        ] {
            let name = format!("alice{c}");
            assert!(check_name(&name).is_err(), "U+{:04X} passed", c as u32);
        }
    }
}
