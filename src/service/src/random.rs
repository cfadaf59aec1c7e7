//! Randomness for secrets and identifiers, always from the operating system's CSPRNG.

use rand::{Rng, RngExt, distr::Alphanumeric};

pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

pub fn alphanumeric(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}
