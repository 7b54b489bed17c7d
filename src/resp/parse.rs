//! The request side of RESP2: a command is an array of bulk strings
//! (`*2\r\n$4\r\nPING\r\n$2\r\nhi\r\n`) or an inline line (`PING hi\r\n`).
//!
//! The parser is I/O-free: it looks at the bytes received so far and either
//! finds one whole command at their start (its arguments as ranges of the
//! buffer, no copy), says more bytes are needed, or refuses the input. It
//! never reads past a declared size it has not checked against
//! [`FrameLimits`], so a client cannot make the server buffer more than
//! [`FrameLimits::max_frame`] bytes for one command.

use std::ops::Range;

/// The most arguments any command may have, whatever [`FrameLimits`] says.
pub const MAX_ARGS: usize = 64;

/// Sizes a command may not exceed. A command over any of them is a
/// protocol error: the connection is answered with `-ERR` and closed,
/// because the rest of its bytes cannot be framed safely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Most arguments in one command, its name included (at most
    /// [`MAX_ARGS`]).
    pub max_args: usize,
    /// Longest argument (a bulk string's declared length).
    pub max_bulk: usize,
    /// Most bytes one command may take on the wire, framing included; also
    /// the longest inline line.
    pub max_frame: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            max_args: MAX_ARGS,
            max_bulk: 16 * 1024,
            max_frame: 64 * 1024,
        }
    }
}

/// Why the bytes cannot be a command. The connection cannot continue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("expected '$', got '{0}'")]
    /// An argument is not a bulk string.
    ExpectedBulk(char),
    #[error("invalid multibulk length")]
    /// The argument count is not a number in range.
    BadArrayLength,
    #[error("invalid bulk length")]
    /// A bulk length is not a number in range.
    BadBulkLength,
    #[error("too many arguments: the limit is {0}")]
    /// More arguments than the limit given.
    TooManyArgs(usize),
    #[error("bulk string of {0} bytes: the limit is {1}")]
    /// A bulk string longer than the limit (length, limit).
    BulkTooLong(usize, usize),
    #[error("command larger than {0} bytes")]
    /// A command longer than the limit given, in bytes.
    FrameTooLong(usize),
    #[error("missing CRLF after a bulk string")]
    /// A bulk string not followed by CRLF.
    MissingCrlf,
    #[error("unbalanced quotes in an inline command")]
    /// An inline command with an unclosed quote.
    UnbalancedQuotes,
}

/// What the buffer starts with.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command of `len` bytes; its arguments were put in `args`.
    /// An empty `args` is an empty inline line: nothing to answer.
    Command {
        /// Bytes the command took: drop them from the buffer.
        len: usize,
    },
    /// Not a whole command yet: read more.
    Incomplete,
}

/// Parses one command at the start of `buf`, putting its arguments' byte
/// ranges (within `buf`) in `args` (cleared first).
pub fn parse_command(
    buf: &[u8],
    limits: &FrameLimits,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    args.clear();
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'*') => parse_array(buf, limits, args),
        Some(_) => parse_inline(buf, limits, args),
    }
}

/// The line starting at `from`, without its CRLF, and the index after it;
/// `None` while no CRLF has arrived. Refuses lines longer than `max`.
fn line(
    buf: &[u8],
    from: usize,
    max: usize,
) -> Result<Option<(Range<usize>, usize)>, ProtocolError> {
    let window = &buf[from..buf.len().min(from.saturating_add(max).saturating_add(2))];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(at) => Ok(Some((from..from + at, from + at + 2))),
        None if window.len() >= max + 2 => Err(ProtocolError::FrameTooLong(max)),
        None => Ok(None),
    }
}

/// A non-negative decimal that fits `usize`, as RESP lengths are written.
fn decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
}

fn parse_array(
    buf: &[u8],
    limits: &FrameLimits,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    // "*<n>": at most 20 digits.
    let Some((head, mut at)) = line(buf, 1, 20).map_err(|_| ProtocolError::BadArrayLength)? else {
        return Ok(Parsed::Incomplete);
    };
    let count = match &buf[head.clone()] {
        // A null or empty array: no command, like Redis.
        b"-1" | b"0" => return Ok(Parsed::Command { len: at }),
        digits => decimal(digits).ok_or(ProtocolError::BadArrayLength)?,
    };
    let max_args = limits.max_args.min(MAX_ARGS);
    if count > max_args {
        return Err(ProtocolError::TooManyArgs(max_args));
    }
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(Parsed::Incomplete),
            Some(b'$') => {}
            Some(&other) => return Err(ProtocolError::ExpectedBulk(char::from(other))),
        }
        let Some((len_digits, data)) =
            line(buf, at + 1, 20).map_err(|_| ProtocolError::BadBulkLength)?
        else {
            return Ok(Parsed::Incomplete);
        };
        let len = decimal(&buf[len_digits]).ok_or(ProtocolError::BadBulkLength)?;
        if len > limits.max_bulk {
            return Err(ProtocolError::BulkTooLong(len, limits.max_bulk));
        }
        let end = data + len;
        if end + 2 > limits.max_frame {
            return Err(ProtocolError::FrameTooLong(limits.max_frame));
        }
        if buf.len() < end + 2 {
            return Ok(Parsed::Incomplete);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        args.push(data..end);
        at = end + 2;
    }
    Ok(Parsed::Command { len: at })
}

/// An inline command: words separated by spaces or tabs, ended by LF (a CR
/// before it is dropped). Double quotes group words, as in `redis-cli`; no
/// escapes are interpreted.
fn parse_inline(
    buf: &[u8],
    limits: &FrameLimits,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    let window = &buf[..buf.len().min(limits.max_frame)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() >= limits.max_frame {
            return Err(ProtocolError::FrameTooLong(limits.max_frame));
        }
        return Ok(Parsed::Incomplete);
    };
    let end = if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    let mut at = 0;
    while at < end {
        match buf[at] {
            b' ' | b'\t' => at += 1,
            b'"' => {
                let close = buf[at + 1..end]
                    .iter()
                    .position(|&b| b == b'"')
                    .ok_or(ProtocolError::UnbalancedQuotes)?;
                args.push(at + 1..at + 1 + close);
                at += close + 2;
            }
            _ => {
                let word = buf[at..end]
                    .iter()
                    .position(|&b| b == b' ' || b == b'\t')
                    .unwrap_or(end - at);
                args.push(at..at + word);
                at += word;
            }
        }
        if args.len() > limits.max_args.min(MAX_ARGS) {
            return Err(ProtocolError::TooManyArgs(limits.max_args.min(MAX_ARGS)));
        }
    }
    Ok(Parsed::Command { len: lf + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8]) -> Result<(Parsed, Vec<&[u8]>), ProtocolError> {
        let mut args = Vec::new();
        let parsed = parse_command(buf, &FrameLimits::default(), &mut args)?;
        Ok((parsed, args.into_iter().map(|r| &buf[r]).collect()))
    }

    #[test]
    fn parses_arrays_of_bulk_strings() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\nrest";
        let (parsed, args) = parse(buf).unwrap();
        assert_eq!(parsed, Parsed::Command { len: buf.len() - 4 });
        assert_eq!(args, [&b"SET"[..], b"k", b""]);
    }

    #[test]
    fn waits_for_every_byte_of_a_command() {
        let buf = b"*2\r\n$4\r\nPING\r\n$5\r\nhello\r\n";
        for cut in 0..buf.len() {
            assert_eq!(
                parse(&buf[..cut]).unwrap().0,
                Parsed::Incomplete,
                "cut {cut}"
            );
        }
        assert!(matches!(parse(buf).unwrap().0, Parsed::Command { len } if len == buf.len()));
    }

    #[test]
    fn bulk_strings_may_hold_any_bytes() {
        let buf = b"*1\r\n$4\r\n\r\n\0\xff\r\n";
        assert_eq!(parse(buf).unwrap().1, [&b"\r\n\0\xff"[..]]);
    }

    #[test]
    fn parses_inline_commands() {
        let (parsed, args) = parse(b"CL.THROTTLE  k 1\t2 \"a b\"\r\nPING\r\n").unwrap();
        assert_eq!(parsed, Parsed::Command { len: 26 });
        assert_eq!(args, [&b"CL.THROTTLE"[..], b"k", b"1", b"2", b"a b"]);
        assert_eq!(parse(b"PING\n").unwrap().1, [&b"PING"[..]]);
        assert_eq!(
            parse(b"\r\n").unwrap(),
            (Parsed::Command { len: 2 }, vec![])
        );
        assert_eq!(parse(b"PING").unwrap().0, Parsed::Incomplete);
        assert_eq!(parse(b"\"a\n"), Err(ProtocolError::UnbalancedQuotes));
    }

    #[test]
    fn refuses_malformed_framing() {
        assert_eq!(parse(b"*x\r\n"), Err(ProtocolError::BadArrayLength));
        assert_eq!(parse(b"*-2\r\n"), Err(ProtocolError::BadArrayLength));
        assert_eq!(
            parse(b"*1\r\n+PING\r\n"),
            Err(ProtocolError::ExpectedBulk('+'))
        );
        assert_eq!(parse(b"*1\r\n$-1\r\n"), Err(ProtocolError::BadBulkLength));
        assert_eq!(
            parse(b"*1\r\n$2\r\nabc\r\n"),
            Err(ProtocolError::MissingCrlf)
        );
        assert_eq!(
            parse(b"*1\r\n$99999999999999999999999\r\n"),
            Err(ProtocolError::BadBulkLength)
        );
        assert_eq!(
            parse(b"*0\r\n").unwrap(),
            (Parsed::Command { len: 4 }, vec![])
        );
    }

    #[test]
    fn refuses_sizes_over_the_limits_before_buffering_them() {
        let limits = FrameLimits {
            max_args: 2,
            max_bulk: 8,
            max_frame: 32,
        };
        let mut args = Vec::new();
        let mut parse = |b: &[u8]| parse_command(b, &limits, &mut args);
        assert_eq!(parse(b"*3\r\n"), Err(ProtocolError::TooManyArgs(2)));
        // Refused from its declared length alone, before the data arrives.
        assert_eq!(
            parse(b"*1\r\n$9\r\n"),
            Err(ProtocolError::BulkTooLong(9, 8))
        );
        assert_eq!(
            parse(b"*2\r\n$0008\r\n12345678\r\n$0008\r\n"),
            Err(ProtocolError::FrameTooLong(32))
        );
        assert_eq!(parse(&[b'a'; 40]), Err(ProtocolError::FrameTooLong(32)));
        assert_eq!(parse(b"a b c\n"), Err(ProtocolError::TooManyArgs(2)));
        // A length line that never ends is refused, not buffered.
        assert_eq!(
            parse(&[b"*1\r\n$".as_slice(), &[b'1'; 30]].concat()),
            Err(ProtocolError::BadBulkLength)
        );
    }
}
