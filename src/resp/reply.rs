//! RESP2 replies, written straight into the connection's output buffer.

use std::io::Write;

/// `+text\r\n`. `text` must hold no CR or LF.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-ERR text\r\n`; CR and LF in `text` become spaces, so that a message
/// that quotes client input cannot break the framing.
pub fn error(out: &mut Vec<u8>, text: &str) {
    error_with(out, "ERR", text);
}

/// `-CODE text\r\n` (`TRYAGAIN`: overloaded, retry later), framed as
/// [`error`].
pub fn error_with(out: &mut Vec<u8>, code: &str, text: &str) {
    out.push(b'-');
    out.extend_from_slice(code.as_bytes());
    out.push(b' ');
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `:n\r\n`.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, ":{n}\r\n");
}

/// `$len\r\nbytes\r\n`.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    let _ = write!(out, "${}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// An array of integers.
pub fn integers(out: &mut Vec<u8>, values: &[i64]) {
    let _ = write!(out, "*{}\r\n", values.len());
    for &v in values {
        integer(out, v);
    }
}

/// `*0\r\n`.
pub fn empty_array(out: &mut Vec<u8>) {
    out.extend_from_slice(b"*0\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_each_type() {
        let mut out = Vec::new();
        simple(&mut out, "PONG");
        error(&mut out, "bad\r\nthing");
        integers(&mut out, &[0, 16, -1]);
        bulk(&mut out, b"a\r\nb");
        empty_array(&mut out);
        assert_eq!(
            out,
            b"+PONG\r\n-ERR bad  thing\r\n*3\r\n:0\r\n:16\r\n:-1\r\n$4\r\na\r\nb\r\n*0\r\n"
        );
    }
}
