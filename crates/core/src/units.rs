//! Byte sizes as people write them: `"512MiB"`, `"1.5GiB"`, `"20G"`, `"100MB"`.
//!
//! The rules, chosen so that a size means one thing wherever it is written:
//!
//! - A size is a number (digits, optionally one `.` and more digits) and a
//!   unit, optionally separated by spaces. The unit is required: a bare `512`
//!   means MiB to `qemu-system -m` and bytes to `qemu-img`, and Ferry refuses
//!   to guess. Write `512B` for bytes.
//! - `B`, `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024, and so are `K`, `M`,
//!   `G`, `T` (and lower-case `k`, `m`, `g`, `t`), because that is what they
//!   mean on a QEMU command line, which operators copy from.
//! - `kB`/`KB`, `MB`, `GB`, `TB` are powers of 1000, as the SI prefixes and disk
//!   vendors (and network tools, for rates) use them.
//! - Units are otherwise case-sensitive: `b` (bits to some) and `mb` are
//!   rejected rather than guessed.
//! - Fractions must come out as a whole number of bytes (`1.5KiB` is 1536 bytes;
//!   `0.1KiB` is rejected).
//!
//! [`parse_size`] is the one parser; rates such as `"100MiB/s"` can be built on
//! it by stripping the `/s`.

use std::fmt;
use std::str::FromStr;

/// 1024 bytes.
pub const KIB: u64 = 1 << 10;
/// 1024² bytes.
pub const MIB: u64 = 1 << 20;
/// 1024³ bytes.
pub const GIB: u64 = 1 << 30;
/// 1024⁴ bytes.
pub const TIB: u64 = 1 << 40;

/// Longest piece of the input repeated in an error message: input may be
/// hostile, and a message must stay readable.
const MAX_ECHO: usize = 40;

/// Longest number part accepted (digits and the point); more cannot be a
/// size that fits in 64 bits anyway, and the limit keeps the arithmetic in
/// `u128` free of overflow.
const MAX_NUMBER_LEN: usize = 30;

/// Why a size string was rejected. Each variant carries the (shortened)
/// input so that the message stands on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    #[error("empty size: write a number and a unit, e.g. \"512MiB\"")]
    Empty,
    #[error("{input:?} is negative")]
    Negative { input: String },
    #[error("{input:?} is not a number followed by a unit, e.g. \"512MiB\"")]
    NotANumber { input: String },
    #[error("{input:?} has no unit: write one, e.g. \"{input}MiB\" or \"{input}B\" for bytes")]
    MissingUnit { input: String },
    #[error(
        "{input:?} has unknown unit {unit:?}: use B, KiB, MiB, GiB, TiB (powers of 1024; \
         K, M, G, T mean the same) or kB, MB, GB, TB (powers of 1000)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("{input:?} is not a whole number of bytes")]
    Fractional { input: String },
    #[error("{input:?} is too large")]
    TooLarge { input: String },
}

/// A byte count that parses from and prints as a size string; handy as a
/// `clap` value type (`--bandwidth 100MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

/// Multiplier of a unit, or `None` when the unit is not one Ferry accepts.
fn unit_multiplier(unit: &str) -> Option<u64> {
    Some(match unit {
        "B" => 1,
        "KiB" | "K" | "k" => KIB,
        "MiB" | "M" | "m" => MIB,
        "GiB" | "G" | "g" => GIB,
        "TiB" | "T" | "t" => TIB,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Shortens `s` for an error message, on a character boundary.
fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

/// Parses a size such as `"512MiB"` into bytes (see the module docs for the
/// rules). Zero is a valid size; callers that need a positive one check.
pub fn parse_size(input: &str) -> Result<u64, UnitsError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitsError::Empty);
    }
    let shown = || echo(s);
    if s.starts_with('-') {
        return Err(UnitsError::Negative { input: shown() });
    }
    let number_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, rest) = s.split_at(number_len);
    let unit = rest.trim_start();

    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    let well_formed = !int_part.is_empty()
        && !frac_part.contains('.')
        && (frac_part.is_empty() != number.contains('.'));
    if !well_formed {
        return Err(UnitsError::NotANumber { input: shown() });
    }
    if unit.is_empty() {
        return Err(UnitsError::MissingUnit { input: shown() });
    }
    let multiplier = unit_multiplier(unit).ok_or_else(|| UnitsError::UnknownUnit {
        input: shown(),
        unit: echo(unit),
    })?;
    if number.len() > MAX_NUMBER_LEN {
        return Err(UnitsError::TooLarge { input: shown() });
    }

    // Exact integer arithmetic: value = int * m + frac * m / 10^len(frac),
    // where the division must leave no remainder.
    let digits = |d: &str| -> u128 {
        d.bytes()
            .fold(0u128, |acc, b| acc * 10 + u128::from(b - b'0'))
    };
    let multiplier = u128::from(multiplier);
    let whole = digits(int_part) * multiplier;
    let scale = 10u128.pow(frac_part.len() as u32);
    let frac_scaled = digits(frac_part) * multiplier;
    if frac_scaled % scale != 0 {
        return Err(UnitsError::Fractional { input: shown() });
    }
    let total = whole + frac_scaled / scale;
    u64::try_from(total).map_err(|_| UnitsError::TooLarge { input: shown() })
}

/// Formats a byte count exactly, in the largest binary unit that divides it
/// (`536870912` → `"512MiB"`, `1536` → `"1536B"`), so that the result always
/// parses back with [`parse_size`] to the same number.
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0B".to_owned();
    }
    for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// Formats a byte count for people, rounded to one decimal in the largest
/// binary unit not above it: `1610612736` → `"1.5 GiB"`, `1000` → `"1000 B"`.
/// Not exact; use [`format_size`] where the value must round-trip.
pub fn format_size_human(bytes: u64) -> String {
    let units = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (unit, size) in units {
        if bytes >= size {
            // Tenths, rounded half up, in integers to avoid float surprises.
            let tenths = (u128::from(bytes) * 10 + u128::from(size) / 2) / u128::from(size);
            return if tenths % 10 == 0 {
                format!("{} {unit}", tenths / 10)
            } else {
                format!("{}.{} {unit}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units_are_powers_of_1024() {
        assert_eq!(parse_size("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("512m"), Ok(512 * MIB));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_size("1T"), Ok(TIB));
        assert_eq!(parse_size("7B"), Ok(7));
    }

    #[test]
    fn decimal_units_are_powers_of_1000() {
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1kB"), Ok(1000));
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
    }

    #[test]
    fn whitespace_around_and_between_is_allowed() {
        assert_eq!(parse_size("  512 MiB "), Ok(512 * MIB));
    }

    #[test]
    fn exact_fractions_are_accepted() {
        assert_eq!(parse_size("1.5GiB"), Ok(GIB + GIB / 2));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert_eq!(parse_size("2.0MiB"), Ok(2 * MIB));
    }

    #[test]
    fn fractions_of_a_byte_are_rejected() {
        assert!(matches!(
            parse_size("0.1KiB"),
            Err(UnitsError::Fractional { .. })
        ));
        assert!(matches!(
            parse_size("1.5B"),
            Err(UnitsError::Fractional { .. })
        ));
    }

    #[test]
    fn missing_unit_is_rejected_with_a_hint() {
        let err = parse_size("512").unwrap_err();
        assert!(matches!(err, UnitsError::MissingUnit { .. }));
        assert!(err.to_string().contains("\"512MiB\""), "{err}");
    }

    #[test]
    fn ambiguous_or_unknown_units_are_rejected() {
        for bad in ["1mb", "1b", "1Mb", "1PiB", "1 bytes", "1MiB/s"] {
            assert!(
                matches!(parse_size(bad), Err(UnitsError::UnknownUnit { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn malformed_numbers_are_rejected() {
        for bad in [
            "MiB", ".5MiB", "1.MiB", "1.2.3MiB", "+1MiB", "0x10MiB", "1e3B",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    UnitsError::NotANumber { .. } | UnitsError::UnknownUnit { .. }
                ),
                "{bad}: {err:?}"
            );
        }
        assert_eq!(parse_size("   "), Err(UnitsError::Empty));
    }

    #[test]
    fn negative_sizes_are_rejected() {
        assert!(matches!(
            parse_size("-512MiB"),
            Err(UnitsError::Negative { .. })
        ));
    }

    #[test]
    fn sizes_beyond_64_bits_are_rejected() {
        assert!(matches!(
            parse_size("16777216TiB"),
            Err(UnitsError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_size(&format!("{}B", "9".repeat(40))),
            Err(UnitsError::TooLarge { .. })
        ));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 * TIB));
    }

    #[test]
    fn long_input_is_shortened_in_messages() {
        let err = parse_size(&format!("1{}", "x".repeat(500))).unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn format_size_picks_largest_exact_unit() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(512 * MIB), "512MiB");
        assert_eq!(format_size(1536 * MIB), "1536MiB");
        assert_eq!(format_size(2 * GIB), "2GiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn format_size_round_trips() {
        for bytes in [0, 1, 1000, 4096, 512 * MIB, 3 * TIB + MIB, u64::MAX] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn format_size_human_rounds_to_one_decimal() {
        assert_eq!(format_size_human(1000), "1000 B");
        assert_eq!(format_size_human(512 * MIB), "512 MiB");
        assert_eq!(format_size_human(GIB + GIB / 2), "1.5 GiB");
        assert_eq!(format_size_human(u64::MAX), "16777216 TiB");
    }

    #[test]
    fn byte_size_parses_and_displays() {
        let size: ByteSize = "100MiB".parse().unwrap();
        assert_eq!(size.bytes(), 100 * MIB);
        assert_eq!(size.to_string(), "100MiB");
    }
}
