//! permessage-deflate negotiation (RFC 7692 §5, §7.1): reading the client's offers, picking
//! the first Herald can honour, and the terms written back in the response header.

use std::fmt;

use http::{HeaderMap, header};
use yawc::DeflateOptions;

use super::clamp_window_bits;
use crate::config::WINDOW_BITS;

/// The window size deflate uses when nothing smaller was agreed.
pub(super) const FULL_WINDOW_BITS: u8 = 15;

/// The permessage-deflate terms of one connection, as the response header states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Agreement {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<u8>,
}

impl fmt::Display for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("permessage-deflate")?;
        if self.server_no_context_takeover {
            f.write_str("; server_no_context_takeover")?;
        }
        if self.client_no_context_takeover {
            f.write_str("; client_no_context_takeover")?;
        }
        if let Some(bits) = self.server_max_window_bits {
            write!(f, "; server_max_window_bits={bits}")?;
        }
        if let Some(bits) = self.client_max_window_bits {
            write!(f, "; client_max_window_bits={bits}")?;
        }
        Ok(())
    }
}

/// One valid permessage-deflate offer (RFC 7692 §7.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Offer {
    pub(super) server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// The largest window the client will inflate with; absent means 15 bits.
    pub(super) server_max_window_bits: Option<u8>,
    /// Present when the client can limit its own window; the value, if any, is a hint.
    client_max_window_bits: Option<Option<u8>>,
}

/// Picks the first permessage-deflate offer the server can honour under `policy`, in the
/// client's order of preference (RFC 7692 §5), across every `Sec-WebSocket-Extensions` line.
/// Other extensions and invalid offers are declined one by one, never the whole header.
pub(super) fn negotiate(headers: &HeaderMap, policy: &DeflateOptions) -> Option<Agreement> {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| split_unquoted(value, ','))
        .filter_map(parse_offer)
        .find_map(|offer| agree(&offer, policy))
}

/// The server's answer to one offer, or `None` to decline it.
fn agree(offer: &Offer, policy: &DeflateOptions) -> Option<Agreement> {
    let server_limit = policy
        .server_max_window_bits
        .map_or(FULL_WINDOW_BITS, clamp_window_bits);
    let server_max_window_bits = match offer.server_max_window_bits {
        // The client cannot inflate anything larger, and deflate cannot go below 9 bits.
        Some(asked) if asked < *WINDOW_BITS.start() => return None,
        // Accepting this parameter means answering it with the same value or a smaller one.
        Some(asked) => Some(asked.min(server_limit)),
        // The server may announce a smaller window than the client could take.
        None => (server_limit < FULL_WINDOW_BITS).then_some(server_limit),
    };
    let client_limit = policy
        .client_max_window_bits
        .map_or(FULL_WINDOW_BITS, clamp_window_bits);
    let client_max_window_bits = match offer.client_max_window_bits {
        // A response must not limit a client that did not offer to be limited.
        None => None,
        Some(hint) => {
            let bits = hint.map_or(client_limit, |hint| hint.min(client_limit));
            (bits < FULL_WINDOW_BITS).then_some(bits)
        }
    };
    Some(Agreement {
        server_no_context_takeover: offer.server_no_context_takeover
            || policy.server_no_context_takeover,
        // Confirming the client's own hint costs it nothing and lets the server inflate with
        // pooled state.
        client_no_context_takeover: offer.client_no_context_takeover
            || policy.client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    })
}

/// Reads one extension from a `Sec-WebSocket-Extensions` list; `None` when it is not
/// permessage-deflate or breaks RFC 7692 §7.1 (unknown or repeated parameter, bad value).
pub(super) fn parse_offer(extension: &str) -> Option<Offer> {
    let mut parts = split_unquoted(extension, ';').into_iter();
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut offer = Offer::default();
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim_end(), Some(unquote(value.trim_start()))),
            None => (parameter, None),
        };
        let name = name.to_ascii_lowercase();
        match (name.as_str(), value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(value)) if offer.server_max_window_bits.is_none() => {
                offer.server_max_window_bits = Some(window_bits(value)?);
            }
            ("client_max_window_bits", value) if offer.client_max_window_bits.is_none() => {
                offer.client_max_window_bits = Some(match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                });
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A window size as RFC 7692 writes it: 8 to 15, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter value may be a quoted string (RFC 6455 §9.1); window sizes never need escapes.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

/// Splits at `separator` outside quoted strings, trimming each part.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(text[start..at].trim());
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionConfig;
    use crate::transport::server_options;
    use http::HeaderValue;

    fn policy(adjust: impl FnOnce(&mut CompressionConfig)) -> DeflateOptions {
        let mut config = CompressionConfig {
            enabled: true,
            ..CompressionConfig::default()
        };
        adjust(&mut config);
        server_options(1024, &config).compression.unwrap()
    }

    fn answer(offers: &str, policy: &DeflateOptions) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(offers).unwrap(),
        );
        negotiate(&headers, policy).map(|agreement| agreement.to_string())
    }

    #[test]
    fn a_plain_offer_gets_no_context_takeover_both_ways_by_default() {
        assert_eq!(
            answer("permessage-deflate", &policy(|_| {})).as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
    }

    #[test]
    fn context_takeover_is_kept_when_configured_unless_the_client_refuses_it() {
        let keep = policy(|c| {
            c.server_no_context_takeover = false;
            c.client_no_context_takeover = false;
        });
        assert_eq!(
            answer("permessage-deflate", &keep).as_deref(),
            Some("permessage-deflate")
        );
        assert_eq!(
            answer("permessage-deflate; server_no_context_takeover", &keep).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
    }

    #[test]
    fn a_requested_server_window_is_answered_with_that_size_or_smaller() {
        assert_eq!(
            answer(
                "permessage-deflate; server_max_window_bits=10",
                &policy(|_| {})
            )
            .as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10"
            )
        );
        let small = policy(|c| c.server_max_window_bits = 11);
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=13", &small).as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=11"
            )
        );
    }

    #[test]
    fn an_offer_needing_an_8_bit_window_is_declined_for_the_next_one() {
        let only_8 = "permessage-deflate; server_max_window_bits=8";
        assert_eq!(answer(only_8, &policy(|_| {})), None);
        let answer = answer(
            &format!("{only_8}, permessage-deflate; server_max_window_bits=9"),
            &policy(|_| {}),
        )
        .unwrap();
        assert!(answer.ends_with("server_max_window_bits=9"), "{answer}");
    }

    #[test]
    fn the_client_window_is_limited_only_when_the_client_offers_it() {
        let small = policy(|c| c.client_max_window_bits = 10);
        assert!(
            !answer("permessage-deflate", &small)
                .unwrap()
                .contains("client_max_window_bits")
        );
        assert!(
            answer("permessage-deflate; client_max_window_bits", &small)
                .unwrap()
                .ends_with("client_max_window_bits=10")
        );
        assert!(
            answer("permessage-deflate; client_max_window_bits=9", &small)
                .unwrap()
                .ends_with("client_max_window_bits=9")
        );
        // A full window need not be stated.
        assert!(
            !answer(
                "permessage-deflate; client_max_window_bits",
                &policy(|_| {})
            )
            .unwrap()
            .contains("client_max_window_bits")
        );
    }

    #[test]
    fn the_first_acceptable_of_several_offers_is_taken() {
        let answer = answer(
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=12; \
             client_max_window_bits, permessage-deflate",
            &policy(|_| {}),
        )
        .unwrap();
        assert!(answer.contains("server_max_window_bits=12"), "{answer}");
    }

    #[test]
    fn offers_breaking_rfc_7692_are_declined() {
        for offer in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; mystery",
            "permessage-deflate;",
            "deflate-frame",
        ] {
            assert_eq!(answer(offer, &policy(|_| {})), None, "{offer}");
        }
    }

    #[test]
    fn quoted_values_and_loose_spacing_are_read() {
        let answer = answer(
            "Permessage-Deflate ;  server_max_window_bits = \"10\" ; client_max_window_bits",
            &policy(|_| {}),
        )
        .unwrap();
        assert!(answer.contains("server_max_window_bits=10"), "{answer}");
    }

    #[test]
    fn a_comma_inside_quotes_does_not_split_offers() {
        assert_eq!(
            split_unquoted(r#"a; p="x,y", b"#, ','),
            [r#"a; p="x,y""#, "b"]
        );
    }
}
