//! Human-readable quantities in scenario files: sizes ("15 GB", "256 KiB") and rates
//! ("1 Gbit/s", "300 MB/s").
//!
//! This module decides only how such strings are spelled and what they mean in bytes and bytes per
//! second; which values are acceptable for which field is decided in [`crate::scenario`].
//! Decimal prefixes (k, M, G, T) are powers of 1000 and binary prefixes (Ki, Mi, Gi, Ti) powers of
//! 1024, as in SI/IEC. A rate in bits is divided by 8.

/// Errors from parsing a size or a rate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    /// The text does not start with a number.
    #[error("{0:?} does not start with a number")]
    NoNumber(String),
    /// The unit is not one this module knows.
    #[error("unknown unit {unit:?} in {text:?} (expected {expected})")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// The whole text.
        text: String,
        /// The units accepted here.
        expected: &'static str,
    },
    /// The value is negative, zero where that makes no sense, or not finite.
    #[error("{0:?} must be a positive, finite quantity")]
    NotPositive(String),
}

const SIZE_UNITS: &str = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB";
const RATE_UNITS: &str =
    "bit/s, kbit/s, Mbit/s, Gbit/s, B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s";

fn split_number(text: &str) -> Result<(f64, &str), UnitError> {
    let t = text.trim();
    let end = t
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .map_or(t.len(), |(i, _)| i);
    // "e" could start a unit ("EB" is not supported anyway); a number never ends in 'e'.
    let (mut num, mut rest) = t.split_at(end);
    while num.ends_with(['e', 'E']) {
        let cut = num.len() - 1;
        rest = &t[cut..];
        num = &t[..cut];
    }
    let value: f64 = num
        .parse()
        .map_err(|_| UnitError::NoNumber(text.to_owned()))?;
    Ok((value, rest.trim()))
}

fn prefix_factor(prefix: &str) -> Option<f64> {
    Some(match prefix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    })
}

fn positive(value: f64, text: &str) -> Result<f64, UnitError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(UnitError::NotPositive(text.to_owned()))
    }
}

/// Parses a size such as `"15 GB"`, `"256 KiB"` or `"4096"` (bytes) into bytes.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let (value, unit) = split_number(text)?;
    let prefix = match unit.strip_suffix('B') {
        Some(p) => p,
        None if unit.is_empty() => "",
        None => {
            return Err(UnitError::UnknownUnit {
                unit: unit.to_owned(),
                text: text.to_owned(),
                expected: SIZE_UNITS,
            });
        }
    };
    let factor = prefix_factor(prefix).ok_or_else(|| UnitError::UnknownUnit {
        unit: unit.to_owned(),
        text: text.to_owned(),
        expected: SIZE_UNITS,
    })?;
    let bytes = positive(value * factor, text)?.round();
    if bytes >= u64::MAX as f64 {
        return Err(UnitError::NotPositive(text.to_owned()));
    }
    Ok(bytes as u64)
}

/// Parses a rate such as `"1 Gbit/s"`, `"300 MB/s"` or `"10Gbps"` into bytes per second.
pub fn parse_rate(text: &str) -> Result<f64, UnitError> {
    let (value, unit) = split_number(text)?;
    let unknown = || UnitError::UnknownUnit {
        unit: unit.to_owned(),
        text: text.to_owned(),
        expected: RATE_UNITS,
    };
    let (prefix, bits) = if let Some(p) = unit.strip_suffix("bit/s") {
        (p, true)
    } else if let Some(p) = unit.strip_suffix("bps") {
        (p, true)
    } else if let Some(p) = unit.strip_suffix("B/s") {
        (p, false)
    } else {
        return Err(unknown());
    };
    let factor = prefix_factor(prefix).ok_or_else(unknown)?;
    let bytes_per_s = value * factor / if bits { 8.0 } else { 1.0 };
    positive(bytes_per_s, text)
}

/// Formats bytes with a binary prefix, for reports.
pub fn fmt_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("15 GB"), Ok(15_000_000_000));
        assert_eq!(parse_size("256 KiB"), Ok(262_144));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5 kB"), Ok(1500));
        assert!(matches!(
            parse_size("-3 GB"),
            Err(UnitError::NotPositive(_))
        ));
        assert!(matches!(
            parse_size("3 parsecs"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_size("GB"), Err(UnitError::NoNumber(_))));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1 Gbit/s"), Ok(125_000_000.0));
        assert_eq!(parse_rate("10Gbps"), Ok(1_250_000_000.0));
        assert_eq!(parse_rate("300 MB/s"), Ok(300_000_000.0));
        assert!(matches!(
            parse_rate("0 MB/s"),
            Err(UnitError::NotPositive(_))
        ));
        assert!(matches!(
            parse_rate("1 GB"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("-1 Gbit/s"),
            Err(UnitError::NotPositive(_))
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1536.0), "1.50 KiB");
    }
}
