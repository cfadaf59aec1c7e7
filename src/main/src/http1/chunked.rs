//! The chunked transfer coding of request bodies (RFC 9112 section 7.1).
//!
//! Strict where laxness lets requests be smuggled past proxies that read the framing
//! differently: chunk lines end in CRLF, sizes are hex without sign or overflow.

use std::io;

use bytes::{Buf, Bytes, BytesMut};

/// The longest chunk extension or trailer section taken (both are ignored).
const MAX_IGNORED: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum State {
    /// Reading the chunk size's hex digits.
    #[default]
    Size,
    /// Whitespace after the size, before an extension or the line's end.
    SizeWhitespace,
    /// Skipping a chunk extension up to the line's CR.
    Extension,
    SizeLf,
    /// `left` bytes of chunk data to give out.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Skipping a trailer field up to its CR.
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChunkedDecoder {
    state: State,
    /// The size being read, then the data left in the current chunk.
    left: u64,
    digits: usize,
    /// Bytes of extensions and trailers skipped so far.
    ignored: usize,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad chunked body: {what}"))
}

impl ChunkedDecoder {
    /// Whether the final chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `buf` and returns the next piece of data, or `None` when
    /// `buf` is used up (more is needed) or the body has ended. Bytes after the body's
    /// end stay in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        while !buf.is_empty() {
            if self.state == State::Data {
                let take = usize::try_from(self.left).unwrap_or(usize::MAX).min(buf.len());
                self.left -= take as u64;
                if self.left == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Some(buf.split_to(take).freeze()));
            }
            if self.state == State::Done {
                return Ok(None);
            }
            let byte = buf[0];
            buf.advance(1);
            self.state = match (self.state, byte) {
                (State::Size, b) if b.is_ascii_hexdigit() => {
                    if self.left > u64::MAX >> 4 {
                        return Err(invalid("chunk size overflows"));
                    }
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    self.left = (self.left << 4) | u64::from(digit);
                    self.digits += 1;
                    State::Size
                }
                (State::Size, b';') if self.digits > 0 => State::Extension,
                (State::Size, b' ' | b'\t') if self.digits > 0 => State::SizeWhitespace,
                (State::Size, b'\r') if self.digits > 0 => State::SizeLf,
                (State::Size, _) => return Err(invalid("chunk size")),
                (State::SizeWhitespace, b' ' | b'\t') => {
                    self.skip()?;
                    State::SizeWhitespace
                }
                (State::SizeWhitespace, b';') => State::Extension,
                (State::SizeWhitespace, b'\r') => State::SizeLf,
                (State::SizeWhitespace, _) => return Err(invalid("chunk size")),
                (State::Extension, b'\r') => State::SizeLf,
                (State::Extension, b'\n') => return Err(invalid("bare LF")),
                (State::Extension, _) => {
                    self.skip()?;
                    State::Extension
                }
                (State::SizeLf, b'\n') if self.left == 0 => State::TrailerStart,
                (State::SizeLf, b'\n') => State::Data,
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => {
                    self.digits = 0;
                    State::Size
                }
                (State::TrailerStart, b'\r') => State::EndLf,
                (State::Trailer, b'\r') => State::TrailerLf,
                (State::TrailerStart | State::Trailer, b'\n') => return Err(invalid("bare LF")),
                (State::TrailerStart | State::Trailer, _) => {
                    self.skip()?;
                    State::Trailer
                }
                (State::TrailerLf, b'\n') => State::TrailerStart,
                (State::EndLf, b'\n') => State::Done,
                _ => return Err(invalid("line ending")),
            };
        }
        Ok(None)
    }

    fn skip(&mut self) -> io::Result<()> {
        self.ignored += 1;
        if self.ignored > MAX_IGNORED {
            return Err(invalid("extensions or trailers too long"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; the data and what is left after.
    fn decode_in_steps(input: &[u8], step: usize) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut decoder = ChunkedDecoder::default();
        let mut data = Vec::new();
        let mut buf = BytesMut::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(bytes) = decoder.decode(&mut buf)? {
                data.extend_from_slice(&bytes);
            }
            if decoder.is_done() {
                break;
            }
        }
        if !decoder.is_done() {
            return Err(invalid("unfinished"));
        }
        Ok((data, buf.to_vec()))
    }

    #[test]
    fn chunks_extensions_and_trailers_decode_whatever_the_read_sizes() {
        let body = b"5 ;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next";
        for step in [1, 2, 3, 7, body.len()] {
            let (data, rest) = decode_in_steps(body, step).unwrap();
            assert_eq!(data, b"hello, world", "step {step}");
            // Whatever followed the body in the last read stays for the next request.
            assert!(b"GET /next".starts_with(&rest), "step {step}: {rest:?}");
        }
        let (data, _) = decode_in_steps(b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!(data, b"0123456789");
    }

    #[test]
    fn malformed_framing_is_refused() {
        for bad in [
            &b"\r\n"[..],                    // no size
            b"-5\r\nhello\r\n0\r\n\r\n",     // sign
            b"5\nhello\r\n0\r\n\r\n",        // bare LF after the size
            b"5\r\nhelloX\r\n0\r\n\r\n",     // data longer than its size
            b"5\r\nhello\r\n0\r\n\n",        // bare LF at the end
            b"10000000000000000\r\n",        // 2^64 overflows
            b"0\r\nTrailer\n\r\n",           // bare LF in a trailer
            b"5 junk\r\nhello\r\n0\r\n\r\n", // text after the size that is no extension
        ] {
            assert!(decode_in_steps(bad, 3).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long_extension = [&b"1;"[..], &[b'x'; MAX_IGNORED + 1], b"\r\na\r\n0\r\n\r\n"].concat();
        assert!(decode_in_steps(&long_extension, 4096).is_err());
    }
}
