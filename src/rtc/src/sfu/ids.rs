//! LiveKit's ids: a kind prefix (`RM_`, `PA_`, `TR_`) and random letters. Clients check
//! the prefixes (the Rust SDK refuses a participant id without `PA_`).

const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn id(prefix: &str) -> String {
    let tail: String =
        (0..12).map(|_| char::from(LETTERS[rand::random_range(0..LETTERS.len())])).collect();
    format!("{prefix}{tail}")
}

pub fn room() -> String {
    id("RM_")
}

pub fn participant() -> String {
    id("PA_")
}

pub fn track() -> String {
    id("TR_")
}
