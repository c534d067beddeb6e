//! Human-written amounts in config files, API bodies and CLI flags: byte
//! quantities in the Kubernetes style (`64Mi`, `1Gi`, `500M`) and durations
//! (`300ms`, `5s`, `2m`). Both serialize back to their canonical text, so a
//! printed default config parses to the same values.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A quantity or duration that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseAmountError {
    #[error("{input:?} is not a byte quantity (use e.g. 4096, 64Mi, 1Gi, 500M)")]
    Quantity { input: String },
    #[error("{input:?} is too large")]
    Overflow { input: String },
    #[error("{input:?} is not a duration (use e.g. 300ms, 5s, 2m, 1h)")]
    Duration { input: String },
}

/// Binary suffixes first: "Mi" must win over "M".
const QUANTITY_SUFFIXES: &[(&str, u64)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

/// A number of bytes. Text form: a plain integer, or an integer with a
/// binary (`Ki Mi Gi Ti`) or decimal (`k M G T`) suffix, as Kubernetes
/// resource quantities are written.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(pub u64);

impl Quantity {
    pub const fn bytes(self) -> u64 {
        self.0
    }

    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
}

impl FromStr for Quantity {
    type Err = ParseAmountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        let bad = || ParseAmountError::Quantity { input: s.into() };
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num
            .parse()
            .map_err(|_| ParseAmountError::Overflow { input: s.into() })?;
        let mult = if suffix.is_empty() {
            1
        } else {
            QUANTITY_SUFFIXES
                .iter()
                .find(|(name, _)| *name == suffix)
                .map(|(_, m)| *m)
                .ok_or_else(bad)?
        };
        n.checked_mul(mult)
            .map(Quantity)
            .ok_or(ParseAmountError::Overflow { input: s.into() })
    }
}

impl fmt::Display for Quantity {
    /// The largest binary suffix that divides exactly; plain bytes otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, mult) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.0 != 0 && self.0.is_multiple_of(mult) {
                return write!(f, "{}{name}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte quantity such as 4096, \"64Mi\" or \"1Gi\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
                u64::try_from(v)
                    .map(Quantity)
                    .map_err(|_| E::custom(format!("{v} is negative; a quantity is >= 0")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Units accepted for durations, longest first so "ms" wins over "m".
const DURATION_UNITS: &[(&str, u64)] = &[("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// A duration with millisecond resolution. Text form: an integer and a unit
/// (`ms`, `s`, `m`, `h`), e.g. `300ms`, `5s`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    pub const fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = ParseAmountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || ParseAmountError::Duration { input: s.into() };
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num
            .parse()
            .map_err(|_| ParseAmountError::Overflow { input: s.into() })?;
        let mult = DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?;
        n.checked_mul(mult)
            .map(HumanDuration::from_millis)
            .ok_or(ParseAmountError::Overflow { input: s.into() })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (name, mult) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
            if ms != 0 && ms.is_multiple_of(mult) {
                return write!(f, "{}{name}", ms / mult);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!("4096".parse(), Ok(Quantity(4096)));
        assert_eq!("64Mi".parse(), Ok(Quantity(64 << 20)));
        assert_eq!("1Gi".parse(), Ok(Quantity(1 << 30)));
        assert_eq!("500M".parse(), Ok(Quantity(500_000_000)));
        assert_eq!("2k".parse(), Ok(Quantity(2000)));
        assert_eq!(" 3Ki ".parse(), Ok(Quantity(3072)));
        for bad in ["", "Mi", "1Xi", "-1", "1.5Gi", "1 Gi", "1mi"] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            "99999999999999999999".parse::<Quantity>(),
            Err(ParseAmountError::Overflow { .. })
        ));
        assert!(matches!(
            "16777216Ti".parse::<Quantity>(),
            Err(ParseAmountError::Overflow { .. })
        ));
    }

    #[test]
    fn quantity_text_round_trips() {
        for q in [0, 1, 4096, 64 << 20, 3 << 30, (1 << 40) + 1, 1_000_000] {
            let text = Quantity(q).to_string();
            assert_eq!(text.parse(), Ok(Quantity(q)), "{text}");
        }
        assert_eq!(Quantity(64 << 20).to_string(), "64Mi");
        assert_eq!(Quantity(1000).to_string(), "1000");
    }

    #[test]
    fn quantity_json_accepts_numbers_and_strings() {
        assert_eq!(
            serde_json::from_str::<Quantity>("\"1Gi\"").unwrap(),
            Quantity(1 << 30)
        );
        assert_eq!(
            serde_json::from_str::<Quantity>("4096").unwrap(),
            Quantity(4096)
        );
        assert!(serde_json::from_str::<Quantity>("-5").is_err());
        assert!(serde_json::from_str::<Quantity>("\"lots\"").is_err());
        assert_eq!(
            serde_json::to_string(&Quantity(2 << 20)).unwrap(),
            "\"2Mi\""
        );
    }

    #[test]
    fn durations() {
        assert_eq!("300ms".parse(), Ok(HumanDuration::from_millis(300)));
        assert_eq!("5s".parse(), Ok(HumanDuration::from_secs(5)));
        assert_eq!("2m".parse(), Ok(HumanDuration::from_secs(120)));
        assert_eq!("1h".parse(), Ok(HumanDuration::from_secs(3600)));
        for bad in ["", "5", "s", "5 s", "5sec", "-1s", "1.5s"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad:?} accepted");
        }
        for d in ["300ms", "5s", "2m", "1h", "1500ms", "0ms"] {
            assert_eq!(d.parse::<HumanDuration>().unwrap().to_string(), d);
        }
    }
}
