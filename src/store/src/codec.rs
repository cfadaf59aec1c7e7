//! Order-preserving key codecs and value codecs.
//!
//! Keys are tuples of typed parts. Every encoding keeps byte order equal to value order,
//! so RocksDB's bytewise comparator sorts typed keys correctly and a prefix of a tuple is
//! a byte prefix of every key that starts with it.
//!
//! - unsigned integers: fixed-width big-endian;
//! - signed integers: big-endian with the sign bit flipped;
//! - strings and byte strings in the last position: raw bytes;
//! - strings and byte strings elsewhere: `0x00` escaped as `0x00 0xFF`, terminated by
//!   `0x00 0x01`, so that a shorter string sorts before its extensions and decoding is
//!   unambiguous whatever follows.

use crate::StoreError;

pub trait KeyCodec: Sized {
    /// Appends the encoding; `last` is true when nothing follows this part in the key.
    fn encode_key(&self, out: &mut Vec<u8>, last: bool);
    /// Consumes this part from the front of `input`.
    fn decode_key(input: &mut &[u8], last: bool) -> Result<Self, StoreError>;

    fn to_key(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode_key(&mut out, true);
        out
    }

    /// The encoding as a prefix of longer keys (every part terminated).
    fn to_prefix(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode_key(&mut out, false);
        out
    }

    fn from_key(mut bytes: &[u8]) -> Result<Self, StoreError> {
        let value = Self::decode_key(&mut bytes, true)?;
        if bytes.is_empty() {
            Ok(value)
        } else {
            Err(StoreError::Codec(format!("{} trailing bytes in key", bytes.len())))
        }
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
    if input.len() < n {
        return Err(StoreError::Codec(format!("key too short: need {n}, have {}", input.len())));
    }
    let (head, tail) = input.split_at(n);
    *input = tail;
    Ok(head)
}

macro_rules! unsigned {
    ($($t:ty),*) => {$(
        impl KeyCodec for $t {
            fn encode_key(&self, out: &mut Vec<u8>, _last: bool) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn decode_key(input: &mut &[u8], _last: bool) -> Result<Self, StoreError> {
                let bytes = take(input, std::mem::size_of::<$t>())?;
                let mut buf = [0u8; std::mem::size_of::<$t>()];
                buf.copy_from_slice(bytes);
                Ok(<$t>::from_be_bytes(buf))
            }
        }
    )*};
}
unsigned!(u8, u16, u32, u64);

impl KeyCodec for i64 {
    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        ((*self as u64) ^ (1 << 63)).encode_key(out, last)
    }
    fn decode_key(input: &mut &[u8], last: bool) -> Result<Self, StoreError> {
        Ok((u64::decode_key(input, last)? ^ (1 << 63)) as i64)
    }
}

fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>, last: bool) {
    if last {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

fn decode_bytes(input: &mut &[u8], last: bool) -> Result<Vec<u8>, StoreError> {
    if last {
        let all = input.to_vec();
        *input = &[];
        return Ok(all);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b != 0 {
            out.push(b);
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(0xFF) => {
                out.push(0);
                i += 2;
            }
            Some(0x01) => {
                *input = &input[i + 2..];
                return Ok(out);
            }
            _ => return Err(StoreError::Codec("bad escape in key string".into())),
        }
    }
    Err(StoreError::Codec("unterminated key string".into()))
}

impl KeyCodec for Vec<u8> {
    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        encode_bytes(self, out, last)
    }
    fn decode_key(input: &mut &[u8], last: bool) -> Result<Self, StoreError> {
        decode_bytes(input, last)
    }
}

impl KeyCodec for String {
    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        encode_bytes(self.as_bytes(), out, last)
    }
    fn decode_key(input: &mut &[u8], last: bool) -> Result<Self, StoreError> {
        String::from_utf8(decode_bytes(input, last)?)
            .map_err(|_| StoreError::Codec("key string is not UTF-8".into()))
    }
}

impl KeyCodec for () {
    fn encode_key(&self, _out: &mut Vec<u8>, _last: bool) {}
    fn decode_key(_input: &mut &[u8], _last: bool) -> Result<Self, StoreError> {
        Ok(())
    }
}

macro_rules! tuple {
    ($($name:ident : $idx:tt),+ ; $lname:ident : $lidx:tt) => {
        impl<$($name: KeyCodec,)+ $lname: KeyCodec> KeyCodec for ($($name,)+ $lname) {
            fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
                $(self.$idx.encode_key(out, false);)+
                self.$lidx.encode_key(out, last);
            }
            fn decode_key(input: &mut &[u8], last: bool) -> Result<Self, StoreError> {
                Ok(($($name::decode_key(input, false)?,)+ $lname::decode_key(input, last)?))
            }
        }
    };
}
tuple!(A: 0; B: 1);
tuple!(A: 0, B: 1; C: 2);
tuple!(A: 0, B: 1, C: 2; D: 3);

/// How a table's values are stored.
pub trait ValueCodec: Sized {
    fn to_value(&self) -> Vec<u8>;
    fn from_value(bytes: &[u8]) -> Result<Self, StoreError>;
}

impl ValueCodec for Vec<u8> {
    fn to_value(&self) -> Vec<u8> {
        self.clone()
    }
    fn from_value(bytes: &[u8]) -> Result<Self, StoreError> {
        Ok(bytes.to_vec())
    }
}

impl ValueCodec for String {
    fn to_value(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_value(bytes: &[u8]) -> Result<Self, StoreError> {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| StoreError::Codec("value is not UTF-8".into()))
    }
}

impl ValueCodec for u64 {
    fn to_value(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
    fn from_value(bytes: &[u8]) -> Result<Self, StoreError> {
        let arr: [u8; 8] =
            bytes.try_into().map_err(|_| StoreError::Codec("u64 value must be 8 bytes".into()))?;
        Ok(u64::from_be_bytes(arr))
    }
}

impl ValueCodec for () {
    fn to_value(&self) -> Vec<u8> {
        Vec::new()
    }
    fn from_value(_bytes: &[u8]) -> Result<Self, StoreError> {
        Ok(())
    }
}

/// A value stored as JSON (for records whose shape will grow).
#[derive(Debug, Clone, PartialEq)]
pub struct Json<T>(pub T);

impl<T: serde::Serialize + serde::de::DeserializeOwned> ValueCodec for Json<T> {
    fn to_value(&self) -> Vec<u8> {
        // Serializing plain data structs cannot fail; an empty value would be caught on read.
        serde_json::to_vec(&self.0).unwrap_or_default()
    }
    fn from_value(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes).map(Json).map_err(|e| StoreError::Codec(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted_by_bytes<K: KeyCodec + Clone + Ord + std::fmt::Debug>(mut keys: Vec<K>) {
        let mut by_value = keys.clone();
        by_value.sort();
        keys.sort_by_key(|k| k.to_key());
        assert_eq!(keys, by_value);
    }

    #[test]
    fn integers_round_trip_and_order() {
        for v in [0u64, 1, 255, 256, u64::MAX] {
            assert_eq!(u64::from_key(&v.to_key()).unwrap(), v);
        }
        for v in [i64::MIN, -1, 0, 1, i64::MAX] {
            assert_eq!(i64::from_key(&v.to_key()).unwrap(), v);
        }
        sorted_by_bytes(vec![5u64, 0, u64::MAX, 256, 255]);
        sorted_by_bytes(vec![5i64, -3, i64::MIN, i64::MAX, 0]);
    }

    #[test]
    fn tuples_with_strings_order_like_values() {
        let keys: Vec<(String, u64)> = vec![
            ("ab".into(), 1),
            ("a".into(), 9),
            ("a\0".into(), 0),
            ("".into(), 3),
            ("a".into(), 2),
            ("b".into(), 0),
        ];
        for k in &keys {
            assert_eq!(<(String, u64)>::from_key(&k.to_key()).unwrap(), *k);
        }
        sorted_by_bytes(keys);
    }

    #[test]
    fn nested_bytes_with_nul_and_ff() {
        let k: (Vec<u8>, Vec<u8>, u32) = (vec![0, 0xFF, 0, 1], vec![0x00], 7);
        assert_eq!(<(Vec<u8>, Vec<u8>, u32)>::from_key(&k.to_key()).unwrap(), k);
    }

    #[test]
    fn prefix_is_byte_prefix() {
        let full = ("room".to_string(), 42u64).to_key();
        assert!(full.starts_with(&"room".to_string().to_prefix()));
        assert!(!("roo".to_string(), 1u64).to_key().starts_with(&"room".to_string().to_prefix()));
    }

    #[test]
    fn malformed_keys_error_not_panic() {
        assert!(u64::from_key(&[1, 2]).is_err());
        assert!(<(String, u64)>::from_key(b"abc").is_err());
        assert!(<(String, u64)>::from_key(&[b'a', 0, 7]).is_err());
        assert!(<(String, u64)>::from_key(&[b'a', 0, 1, 0]).is_err());
        assert!(<(u64, u64)>::from_key(&[0; 17]).is_err());
    }
}
