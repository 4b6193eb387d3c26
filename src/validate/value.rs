//! What user data a store can keep exactly: every JSON value of a push
//! passes [`storable`].

use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};
use crate::protocol::MAX_NUMBER_DIGITS;

/// A NUL character in `what`: no store can keep it.
pub(super) fn nul(what: &str) -> Error {
    Error::invalid(
        ErrorCode::NulCharacter,
        format!("{what} contains a NUL character (\\u0000), which cannot be stored"),
    )
}

/// Rejects what no store can keep exactly, anywhere in a JSON value:
/// NUL characters (keys included), and numbers that written out in full
/// have more than [`MAX_NUMBER_DIGITS`] digits on either side of the
/// point (PostgreSQL would write `1e100000` out in full). Every other
/// number is kept with its digits, whatever its size.
pub(super) fn storable(what: &str, value: &Value) -> Result<()> {
    match value {
        Value::String(s) if s.contains('\0') => Err(nul(what)),
        Value::Number(n) if !number_in_range(&n.to_string()) => Err(Error::invalid(
            ErrorCode::NumberOutOfRange,
            format!(
                "{what}: a number written out in full may have at most {MAX_NUMBER_DIGITS} digits on either side of the point"
            ),
        )),
        Value::Array(items) => items.iter().try_for_each(|v| storable(what, v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            if k.contains('\0') {
                Err(nul(what))
            } else {
                storable(what, v)
            }
        }),
        _ => Ok(()),
    }
}

/// Whether a JSON number (its text) written out in full keeps within
/// [`MAX_NUMBER_DIGITS`] on either side of the point.
fn number_in_range(text: &str) -> bool {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i64>().ok()),
        None => (text, Some(0)),
    };
    let Some(exponent) = exponent else {
        return false; // an exponent beyond i64: far out of range
    };
    let mantissa = mantissa.trim_start_matches('-');
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let max = MAX_NUMBER_DIGITS as i64;
    // Saturating: an exponent near either end of i64 must not wrap past the bound.
    (whole.len() as i64).saturating_add(exponent) <= max && (fraction.len() as i64).saturating_sub(exponent) <= max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_kept_unless_written_out_they_pass_the_digit_bound() {
        for kept in [
            "0",
            "-7",
            "1.50",
            "1e2",
            "1E-7",
            "-0",
            "1180591620717411303424123",
            "1e999",
            "1e-999",
            "0.5e-999",
        ] {
            assert!(number_in_range(kept), "{kept}");
        }
        let thousand_digits = "9".repeat(1000);
        assert!(number_in_range(&thousand_digits));
        for refused in [
            "1e1000",
            "10e999",
            "1e-1001",
            "0.1e-1000",
            "1e99999999999999999999",
            "1e9223372036854775807",
            "1e-9223372036854775808",
            "0.5e-9223372036854775808",
            &format!("{thousand_digits}0"),
        ] {
            assert!(!number_in_range(refused), "{refused}");
        }
    }
}
