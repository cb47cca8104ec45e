//! Configuration values that TOML spells as text or bare numbers but the code uses typed:
//! durations and port ranges. Each is parsed once, when the configuration is deserialised,
//! so a bad value is refused at load naming its key (`turn.relay_ports: "70000-80000" is not
//! a port range (1-65535)`) and no consumer parses it again. Each is written back in one
//! canonical form, which the next load reads as the same value.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A length of time in whole seconds. Written as a string with a unit, `"30s"`, `"10m"`,
/// `"2h"`, `"1d"`, or as a plain number that counts the key's own unit, `PLAIN` seconds:
/// seconds for most keys (`Duration`, the default), minutes for `fraud.blacklist_minutes`
/// ([`Minutes`]), so every file written before units existed keeps its meaning. Written
/// back as a string in the largest unit that divides it: `600` seconds is `"10m"`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration<const PLAIN: u64 = 1> {
    secs: u64,
}

/// A [`Duration`] whose plain numbers count minutes.
pub type Minutes = Duration<60>;

/// The units a duration may carry, largest first (the order [`Duration`]'s `Display` tries).
const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)];

impl<const PLAIN: u64> Duration<PLAIN> {
    pub const fn from_secs(secs: u64) -> Self {
        Duration { secs }
    }

    pub const fn as_secs(self) -> u64 {
        self.secs
    }

    /// The same length as a [`std::time::Duration`].
    pub const fn get(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.secs)
    }

    fn plain_unit() -> &'static str {
        match PLAIN {
            1 => "seconds",
            60 => "minutes",
            3600 => "hours",
            86_400 => "days",
            _ => "units",
        }
    }

    fn not_a_duration(text: &str) -> String {
        format!(
            "\"{text}\" is not a duration (a number of {}, or 30s, 10m, 2h, 1d)",
            Self::plain_unit()
        )
    }

    fn too_long(text: &str) -> String {
        format!("\"{text}\" is too long a duration")
    }

    /// A plain number, in the key's unit.
    pub fn from_number(n: u64) -> Result<Self, String> {
        n.checked_mul(PLAIN)
            .map(Self::from_secs)
            .ok_or_else(|| Self::too_long(&n.to_string()))
    }

    /// `"30s"`, `"10m"` (or `"10min"`), `"2h"`, `"1d"`, or a number alone in the key's unit;
    /// blanks around the number and the unit are allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(Self::not_a_duration(text));
        }
        let scale = match unit.trim() {
            "" => PLAIN,
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(Self::not_a_duration(text)),
        };
        // All digits: the only way to fail is to overflow.
        let n: u64 = num.parse().map_err(|_| Self::too_long(text))?;
        n.checked_mul(scale)
            .map(Self::from_secs)
            .ok_or_else(|| Self::too_long(text))
    }
}

impl<const PLAIN: u64> fmt::Display for Duration<PLAIN> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, size) = UNITS
            .iter()
            .copied()
            .find(|(_, size)| self.secs > 0 && self.secs.is_multiple_of(*size))
            .unwrap_or(("s", 1));
        write!(f, "{}{unit}", self.secs / size)
    }
}

impl<const PLAIN: u64> fmt::Debug for Duration<PLAIN> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({self})")
    }
}

impl<const PLAIN: u64> Serialize for Duration<PLAIN> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, const PLAIN: u64> Deserialize<'de> for Duration<PLAIN> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const PLAIN: u64>;
        impl<const PLAIN: u64> Visitor<'_> for V<PLAIN> {
            type Value = Duration<PLAIN>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a duration: a number of {}, or a string such as \"30s\", \"10m\", \"2h\", \"1d\"",
                    Duration::<PLAIN>::plain_unit()
                )
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Duration::from_number(n).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(Duration::<PLAIN>::not_a_duration(&n.to_string()))),
                }
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Duration::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V::<PLAIN>)
    }
}

/// An inclusive range of UDP ports, written `"low-high"`; neither end is 0 and the low port
/// is not above the high one, so a range is never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    /// The default of `turn.relay_ports`, 16384-32767.
    pub const DEFAULT_RELAY: PortRange = PortRange {
        low: 16384,
        high: 32767,
    };

    pub fn new(low: u16, high: u16) -> Result<PortRange, String> {
        if low == 0 {
            return Err(format!("\"{low}-{high}\" is not a port range (1-65535)"));
        }
        if low > high {
            return Err(format!(
                "\"{low}-{high}\": the low port is above the high port"
            ));
        }
        Ok(PortRange { low, high })
    }

    pub fn parse(s: &str) -> Result<PortRange, String> {
        let bad = || format!("\"{s}\" is not a port range (1-65535)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let low: u16 = a.trim().parse().map_err(|_| bad())?;
        let high: u16 = b.trim().parse().map_err(|_| bad())?;
        if low == 0 {
            return Err(bad());
        }
        if low > high {
            return Err(format!("\"{s}\": the low port is above the high port"));
        }
        Ok(PortRange { low, high })
    }

    pub fn low(&self) -> u16 {
        self.low
    }

    pub fn high(&self) -> u16 {
        self.high
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    pub fn len(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortRange;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port range such as \"16384-32767\"")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
                PortRange::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_plain_numbers_in_the_keys_unit() {
        for (text, secs) in [
            ("30s", 30),
            ("10m", 600),
            ("10min", 600),
            ("2h", 7200),
            ("1d", 86_400),
            (" 5 s ", 5),
            ("45", 45),
            ("0s", 0),
        ] {
            assert_eq!(Duration::<1>::parse(text), Ok(Duration::from_secs(secs)));
        }
        assert_eq!(Minutes::parse("10"), Ok(Minutes::from_secs(600)));
        assert_eq!(Minutes::parse("30s"), Ok(Minutes::from_secs(30)));
        assert_eq!(Minutes::from_number(3), Ok(Minutes::from_secs(180)));
        for bad in ["", "s", "10 x", "1.5h", "-5", "10ms", "h10", "1h30m"] {
            let e = Duration::<1>::parse(bad).unwrap_err();
            assert!(
                e.contains("is not a duration (a number of seconds"),
                "{bad}: {e}"
            );
        }
        assert!(Minutes::parse("x")
            .unwrap_err()
            .contains("a number of minutes"));
    }

    #[test]
    fn durations_that_overflow_are_refused_not_wrapped() {
        assert!(Minutes::from_number(u64::MAX / 2).is_err());
        assert!(Duration::<1>::parse("999999999999999999d").is_err());
        assert!(Duration::<1>::parse("99999999999999999999999s").is_err());
        assert_eq!(
            Duration::<1>::from_number(u64::MAX),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit_and_read_back() {
        for (secs, text) in [
            (0, "0s"),
            (5, "5s"),
            (90, "90s"),
            (600, "10m"),
            (3600, "1h"),
            (5400, "90m"),
            (86_400, "1d"),
            (90_000, "25h"),
            (86_401, "86401s"),
        ] {
            let d = Duration::<1>::from_secs(secs);
            assert_eq!(d.to_string(), text);
            assert_eq!(Duration::<1>::parse(text), Ok(d));
            // The unit is always written, so a minutes key reads it back the same.
            assert_eq!(Minutes::parse(text), Ok(Minutes::from_secs(secs)));
        }
    }

    #[test]
    fn port_ranges() {
        let r = PortRange::parse("50000-50003").unwrap();
        assert_eq!((r.low(), r.high(), r.len()), (50000, 50003, 4));
        assert!(r.contains(50000) && r.contains(50003) && !r.contains(50004));
        assert_eq!(r.to_string(), "50000-50003");
        assert_eq!(PortRange::parse(" 7 - 7 ").unwrap().len(), 1);
        for bad in ["70000-80000", "0-10", "10", "a-b", "-5-10", ""] {
            assert_eq!(
                PortRange::parse(bad).unwrap_err(),
                format!("\"{bad}\" is not a port range (1-65535)")
            );
        }
        assert!(PortRange::parse("2000-1000")
            .unwrap_err()
            .contains("the low port is above the high port"));
        assert!(PortRange::new(0, 5).is_err());
        assert!(PortRange::new(6, 5).is_err());
        assert_eq!(PortRange::new(1, 65535).unwrap().len(), 65535);
    }
}
