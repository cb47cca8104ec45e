//! A reader for ASN.1 aligned PER (ITU-T X.691, ALIGNED variant): just the encodings H.225.0
//! uses. Every read is bounds-checked and every reader carries a step budget shared with the
//! readers of the open types inside it, so a hostile message costs at most a fixed amount of
//! work whatever lengths and counts it claims. Fragmented lengths (16K and more) are refused:
//! no H.225.0 message the proxy looks at comes near them.

use std::cell::Cell;

/// Why a PER encoding could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerError {
    /// A length or count runs past the end of the data.
    Truncated,
    /// A value the type cannot take, or an encoding the proxy does not accept.
    Invalid(&'static str),
    /// The step budget or the nesting limit is spent.
    TooComplex,
}

pub type Result<T> = std::result::Result<T, PerError>;

/// Work allowed per decoded message (bits read, elements, fields): far above what any real
/// H.225.0 message needs, far below what would make a message expensive.
pub const STEP_BUDGET: u32 = 200_000;

/// Elements of one SEQUENCE OF: H.225.0 lists (aliases, addresses, parameters) hold a few;
/// thousands are an attack on whoever decodes them next, and are refused.
pub const MAX_ELEMENTS: usize = 1024;

/// Bounds-checked bit reader over one PER encoding.
pub struct Reader<'a> {
    data: &'a [u8],
    /// Position in bits.
    pos: usize,
    budget: &'a Cell<u32>,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8], budget: &'a Cell<u32>) -> Reader<'a> {
        Reader {
            data,
            pos: 0,
            budget,
        }
    }

    /// Spends `n` steps of the budget.
    pub fn step(&self, n: u32) -> Result<()> {
        let left = self.budget.get();
        if left < n {
            return Err(PerError::TooComplex);
        }
        self.budget.set(left - n);
        Ok(())
    }

    fn bits_left(&self) -> usize {
        (self.data.len() * 8).saturating_sub(self.pos)
    }

    pub fn bit(&mut self) -> Result<bool> {
        Ok(self.bits(1)? == 1)
    }

    /// Up to 32 bits, most significant first.
    pub fn bits(&mut self, n: u32) -> Result<u32> {
        debug_assert!(n <= 32);
        if (n as usize) > self.bits_left() {
            return Err(PerError::Truncated);
        }
        self.step(1)?;
        let mut v: u32 = 0;
        for _ in 0..n {
            let byte = self.data[self.pos / 8];
            let b = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u32::from(b);
            self.pos += 1;
        }
        Ok(v)
    }

    pub fn align(&mut self) {
        self.pos = self.pos.div_ceil(8) * 8;
    }

    /// `n` whole octets, after aligning.
    pub fn octets(&mut self, n: usize) -> Result<&'a [u8]> {
        self.align();
        let start = self.pos / 8;
        if n > self.data.len().saturating_sub(start) {
            return Err(PerError::Truncated);
        }
        self.step(1)?;
        self.pos += n * 8;
        Ok(&self.data[start..start + n])
    }

    /// A constrained whole number in `0..range` (X.691 11.5.7, ALIGNED).
    pub fn constrained(&mut self, range: u64) -> Result<u64> {
        match range {
            0 => Err(PerError::Invalid("empty range")),
            1 => Ok(0),
            2..=255 => {
                let bits = 64 - (range - 1).leading_zeros();
                Ok(u64::from(self.bits(bits)?))
            }
            256 => {
                self.align();
                Ok(u64::from(self.bits(8)?))
            }
            257..=65536 => {
                self.align();
                Ok(u64::from(self.bits(16)?))
            }
            _ => {
                // Length in octets (1..=n) as a constrained whole number, then the octets.
                let max_octets = (64 - (range - 1).leading_zeros()).div_ceil(8) as u64;
                let n = self.constrained(max_octets)? + 1;
                let raw = self.octets(n as usize)?;
                let v = raw.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b));
                if v >= range {
                    return Err(PerError::Invalid("value above its range"));
                }
                Ok(v)
            }
        }
    }

    /// An INTEGER constrained to `lb..=ub`, not extensible.
    pub fn int(&mut self, lb: u64, ub: u64) -> Result<u64> {
        let v = self.constrained(ub - lb + 1)?;
        let v = lb + v;
        if v > ub {
            return Err(PerError::Invalid("value above its range"));
        }
        Ok(v)
    }

    /// An unconstrained length determinant (X.691 11.9.3.5-8); fragments refused.
    pub fn length(&mut self) -> Result<usize> {
        self.align();
        let first = self.bits(8)?;
        if first & 0x80 == 0 {
            return Ok(first as usize);
        }
        if first & 0x40 == 0 {
            let second = self.bits(8)?;
            return Ok((((first & 0x3f) << 8) | second) as usize);
        }
        Err(PerError::Invalid("fragmented length"))
    }

    /// A length constrained to `lb..=ub` (ub below 64K).
    pub fn length_in(&mut self, lb: usize, ub: usize) -> Result<usize> {
        if lb == ub {
            return Ok(lb);
        }
        Ok(lb + self.constrained((ub - lb + 1) as u64)? as usize)
    }

    /// A normally small non-negative whole number (X.691 11.6).
    pub fn small(&mut self) -> Result<usize> {
        if !self.bit()? {
            return Ok(self.bits(6)? as usize);
        }
        let n = self.length()?;
        if n == 0 || n > 4 {
            return Err(PerError::Invalid("normally small number too large"));
        }
        let raw = self.octets(n)?;
        Ok(raw.iter().fold(0usize, |v, b| (v << 8) | usize::from(*b)))
    }

    /// An open type (X.691 11.2): its encoding as a reader of its own, sharing the budget.
    pub fn open(&mut self) -> Result<Reader<'a>> {
        let n = self.length()?;
        let data = self.octets(n)?;
        Ok(Reader::new(data, self.budget))
    }

    /// An OCTET STRING of a size in `lb..=ub` (`None`: no upper bound).
    pub fn octet_string(&mut self, lb: usize, ub: Option<usize>) -> Result<&'a [u8]> {
        match ub {
            Some(ub) if lb == ub && ub <= 2 => {
                // Fixed and at most two octets: a bit-field, not aligned. Only ever skipped
                // by the proxy, so its value is not handed out.
                if ub > 0 {
                    self.bits(8 * ub as u32)?;
                }
                Ok(&[])
            }
            Some(ub) if lb == ub => self.octets(ub),
            Some(ub) => {
                let n = self.length_in(lb, ub)?;
                self.octets(n)
            }
            None => {
                let n = self.length()?;
                if n < lb {
                    return Err(PerError::Invalid("string below its size"));
                }
                self.octets(n)
            }
        }
    }

    /// An OBJECT IDENTIFIER (its contents octets, skipped).
    pub fn oid(&mut self) -> Result<()> {
        self.octet_string(0, None).map(|_| ())
    }

    /// A BMPString of a size in `lb..=ub` (`None`: no upper bound), as UTF-16 decoded text.
    pub fn bmp_string(&mut self, lb: usize, ub: Option<usize>) -> Result<String> {
        let n = match ub {
            Some(ub) => self.length_in(lb, ub)?,
            None => self.length()?,
        };
        if n < lb {
            return Err(PerError::Invalid("string below its size"));
        }
        let raw = self.octets(n.checked_mul(2).ok_or(PerError::Truncated)?)?;
        self.step(n as u32 / 64)?;
        let units = raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]));
        char::decode_utf16(units)
            .collect::<std::result::Result<String, _>>()
            .map_err(|_| PerError::Invalid("BMPString is not UTF-16"))
    }

    /// An IA5String of a size in `lb..=ub` (`None`: no upper bound), 8 bits a character.
    pub fn ia5_string(&mut self, lb: usize, ub: Option<usize>) -> Result<String> {
        let n = match ub {
            Some(ub) => self.length_in(lb, ub)?,
            None => self.length()?,
        };
        if n < lb {
            return Err(PerError::Invalid("string below its size"));
        }
        let raw = self.octets(n)?;
        if !raw.is_ascii() {
            return Err(PerError::Invalid("IA5String is not ASCII"));
        }
        Ok(raw.iter().map(|b| char::from(*b)).collect())
    }

    /// A string of `lb..=ub` characters of `bits` bits each (a permitted alphabet), skipped.
    pub fn skip_narrow_string(&mut self, lb: usize, ub: usize, bits: usize) -> Result<()> {
        let n = self.length_in(lb, ub)?;
        if n == 0 {
            return Ok(());
        }
        if ub * bits > 16 {
            self.align();
        }
        let total = n * bits;
        if total > self.bits_left() {
            return Err(PerError::Truncated);
        }
        self.step(1)?;
        self.pos += total;
        Ok(())
    }

    /// The extension bit of an extensible type.
    pub fn extended(&mut self) -> Result<bool> {
        self.bit()
    }

    /// The presence bitmap of `n` OPTIONAL components.
    pub fn presence(&mut self, n: usize) -> Result<Vec<bool>> {
        (0..n).map(|_| self.bit()).collect()
    }

    /// The extension additions of a SEQUENCE whose extension bit was set: their presence
    /// bitmap, then each present one as an open type handed to `each(index, reader)`.
    pub fn additions(
        &mut self,
        mut each: impl FnMut(usize, &mut Reader<'a>) -> Result<()>,
    ) -> Result<()> {
        let n = self.small()? + 1;
        self.step(n as u32)?;
        let present = self.presence(n)?;
        for (i, p) in present.into_iter().enumerate() {
            if p {
                let mut inner = self.open()?;
                each(i, &mut inner)?;
            }
        }
        Ok(())
    }

    /// Skips the extension additions of a SEQUENCE whose extension bit was set.
    pub fn skip_additions(&mut self) -> Result<()> {
        self.additions(|_, _| Ok(()))
    }

    /// The index of a CHOICE with `root` alternatives; `Err(index)` of an extension
    /// alternative (whose value follows as an open type).
    pub fn choice(
        &mut self,
        extensible: bool,
        root: usize,
    ) -> Result<std::result::Result<usize, usize>> {
        if extensible && self.extended()? {
            return Ok(Err(self.small()?));
        }
        Ok(Ok(self.constrained(root as u64)? as usize))
    }

    /// A SEQUENCE OF count: unconstrained, or constrained to `lb..=ub`.
    pub fn count(&mut self, bounds: Option<(usize, usize)>) -> Result<usize> {
        let n = match bounds {
            Some((lb, ub)) => self.length_in(lb, ub)?,
            None => self.length()?,
        };
        // Every element takes at least one bit: more than that is a lie caught here.
        if n > self.bits_left() {
            return Err(PerError::Truncated);
        }
        if n > MAX_ELEMENTS {
            return Err(PerError::TooComplex);
        }
        self.step(n as u32)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constrained_numbers_follow_the_aligned_rules() {
        let budget = Cell::new(STEP_BUDGET);
        // 3 bits (range 7), then aligned octet (range 256), then aligned 16 bits.
        let data = [0b1010_0000, 0xAB, 0x12, 0x34];
        let mut r = Reader::new(&data, &budget);
        assert_eq!(r.constrained(7).unwrap(), 5);
        assert_eq!(r.constrained(256).unwrap(), 0xAB);
        assert_eq!(r.constrained(65536).unwrap(), 0x1234);
        assert_eq!(r.constrained(2), Err(PerError::Truncated));
    }

    #[test]
    fn lengths_and_open_types() {
        let budget = Cell::new(STEP_BUDGET);
        let data = [0x81, 0x02, 0xC0, 0x00];
        let mut r = Reader::new(&data, &budget);
        assert_eq!(r.length().unwrap(), 0x102);
        assert!(matches!(r.length(), Err(PerError::Invalid(_))));
        let data = [0x05, 1, 2];
        let mut r = Reader::new(&data, &budget);
        assert!(matches!(r.open(), Err(PerError::Truncated)));
    }

    #[test]
    fn the_budget_ends_work() {
        let budget = Cell::new(3);
        let data = [0u8; 8];
        let mut r = Reader::new(&data, &budget);
        assert!(r.bit().is_ok());
        assert!(r.bit().is_ok());
        assert!(r.bit().is_ok());
        assert_eq!(r.bit(), Err(PerError::TooComplex));
    }
}
