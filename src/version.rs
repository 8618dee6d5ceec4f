//! Versions as Zero writes them: LSNs, lexi-encoded state versions and watermarks.
//!
//! A watermark is the lexi encoding of a commit LSN, so that versions compare correctly as
//! strings (in SQLite, in cookies and in the client).

use std::fmt;

/// A Postgres log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses Postgres' `HI/LO` hex notation.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return None;
        }
        Some(Lsn((hi << 32) | lo))
    }

    /// The state version (watermark) of a commit at this LSN.
    pub fn to_version(self) -> String {
        lexi_encode(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Encodes a number so that encodings sort like the numbers: the base-36 length (minus one) in
/// one base-36 digit, then the base-36 digits.
pub fn lexi_encode(n: u64) -> String {
    let digits = to_base36(n as u128);
    let len = to_base36((digits.len() - 1) as u128);
    debug_assert_eq!(len.len(), 1, "u64 has at most 13 base-36 digits");
    format!("{len}{digits}")
}

/// Decodes [`lexi_encode`]'s output; `None` for anything else.
pub fn lexi_decode(s: &str) -> Option<u64> {
    let mut chars = s.chars();
    let len = chars.next()?.to_digit(36)? as usize + 1;
    let rest = chars.as_str();
    if rest.len() != len {
        return None;
    }
    u64::from_str_radix(rest, 36).ok()
}

fn to_base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexi_vectors_from_the_reference() {
        assert_eq!(lexi_encode(0), "00");
        assert_eq!(lexi_encode(1), "01");
        assert_eq!(lexi_encode(10), "0a");
        assert_eq!(lexi_encode(35), "0z");
        assert_eq!(lexi_encode(36), "110");
        assert_eq!(lexi_encode(46655), "2zzz");
        assert_eq!(Lsn::parse("0/1A2B3C4").unwrap().to_version(), "4gc4w4");
        assert_eq!(Lsn::parse("16/B374D848").unwrap().to_version(), "718sh0nk8");
    }

    #[test]
    fn lexi_sorts_like_numbers_and_round_trips() {
        let mut prev = String::new();
        for n in [
            0u64,
            1,
            35,
            36,
            1295,
            1296,
            99999,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let e = lexi_encode(n);
            assert!(e > prev, "{e} should sort after {prev}");
            assert_eq!(lexi_decode(&e), Some(n));
            prev = e;
        }
        assert_eq!(lexi_decode("0"), None);
        assert_eq!(lexi_decode("1z"), None);
    }

    #[test]
    fn lsn_display_and_parse() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.to_string(), "16/B374D848");
        assert!(Lsn::parse("0/9").unwrap() < Lsn::parse("0/10").unwrap());
        assert_eq!(Lsn::parse("zz"), None);
    }
}
