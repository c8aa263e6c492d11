//! A small deterministic mutator (and the seeded random numbers the differential SQL
//! generator shares) for the corpus replay in CI: without libFuzzer's coverage
//! feedback it cannot find new paths, but with a fixed seed it sends the same few thousand
//! broken variants of every seed on every run: lengths that lie, cut messages, flipped
//! bytes, spliced inputs. Coverage-guided runs are `scripts/fuzz.sh`.

/// SplitMix64: tiny, fast, and the same sequence on every machine for one seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values that break length and count fields: zero, one, signed and unsigned extremes.
const LIARS: &[u32] = &[0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF];

/// One to four mutations of `input`, `other` available for splicing.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] = rng.next_u64() as u8;
            }
            2 if out.len() >= 4 => {
                // A length or count that lies, in either byte order.
                let at = rng.below(out.len() - 3);
                let liar = LIARS[rng.below(LIARS.len())];
                let bytes = if rng.below(2) == 0 { liar.to_le_bytes() } else { liar.to_be_bytes() };
                out[at..at + 4].copy_from_slice(&bytes);
            }
            3 if !out.is_empty() => out.truncate(rng.below(out.len())),
            4 if !out.is_empty() => {
                let from = rng.below(out.len());
                let to = (from + 1 + rng.below(16)).min(out.len());
                out.drain(from..to);
            }
            5 => {
                // A chunk repeated: nesting, duplicated fields, long runs.
                let from = rng.below(out.len() + 1);
                let to = (from + rng.below(64)).min(out.len());
                let chunk = out[from..to].to_vec();
                for _ in 0..rng.below(8) {
                    out.splice(to..to, chunk.iter().copied());
                }
            }
            _ if !other.is_empty() => {
                // The head of this input on the tail of another.
                let cut = rng.below(out.len() + 1);
                let from = rng.below(other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out
}
