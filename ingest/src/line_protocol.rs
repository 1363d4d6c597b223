//! Zero-copy parser for InfluxDB line protocol. Each `\n`-separated line (a trailing `\r`
//! is dropped) is `measurement[,tag_key=tag_value...] field_key=field_value[,...] [timestamp]`,
//! with one or more spaces between the three sections; the measurement takes `\,`, `\ ` and
//! `\\` escapes, tag keys, tag values and field keys take `\,`, `\=`, `\ ` and `\\`, and a
//! field value is a float, an `i`-suffixed signed or `u`-suffixed unsigned integer, a boolean
//! or a double-quoted string with `\"` and `\\` escapes; [`parse_lines`] skips blank lines and
//! `#` comments. Tokens borrow from the request body unless unescaping changed them. The
//! parser never panics: every malformed line, including one that is not valid UTF-8, becomes
//! a [`LineError`] giving the line, the character column where the problem starts and what
//! is wrong, and the lines around it are still parsed.
//!
//! Parsing a line allocates nothing in the common case: names and values are slices of
//! the body, and a line's tags and fields are kept inline in the [`ParsedLine`] up to
//! [`INLINE_TAGS`] and [`INLINE_FIELDS`] of them. Only an escaped name or value that
//! unescaping changes, a line with more tags or fields than that, and a rejected line
//! (its message and text) allocate. `ingest/tests/no_alloc.rs` holds it to that.

use std::borrow::Cow;
use std::fmt;
use std::iter::FusedIterator;

use smallvec::SmallVec;

/// Tags a [`ParsedLine`] holds without a heap allocation; the city's tables carry two or three.
pub const INLINE_TAGS: usize = 4;
/// Fields a [`ParsedLine`] holds without a heap allocation; the city's tables carry two to four.
pub const INLINE_FIELDS: usize = 4;

/// A line's tag key/value pairs, inline up to [`INLINE_TAGS`].
pub type Tags<'a> = SmallVec<[(Cow<'a, str>, Cow<'a, str>); INLINE_TAGS]>;
/// A line's field key/value pairs, inline up to [`INLINE_FIELDS`].
pub type Fields<'a> = SmallVec<[(Cow<'a, str>, FieldValue<'a>); INLINE_FIELDS]>;

/// One parsed line of line protocol, borrowing from the body where no unescaping was needed.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine<'a> {
    /// 1-based line number in the body (every physical line counts, blank and comment lines included).
    pub line_number: usize,
    /// The measurement (table) name, unescaped.
    pub measurement: Cow<'a, str>,
    /// Tag key/value pairs in the order written (not sorted). Keys unique within a line.
    pub tags: Tags<'a>,
    /// Field key/value pairs in the order written; at least one. If a key repeats, keep both (caller takes the last).
    pub fields: Fields<'a>,
    /// The timestamp as written (an integer in the request's precision), None when omitted.
    pub timestamp: Option<i64>,
}

/// A field value, typed by its line-protocol syntax.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    /// A finite float, written without a suffix (`1`, `-1.5`, `1e3`).
    Float(f64),
    /// A signed integer, written with an `i` suffix (`-12i`).
    Integer(i64),
    /// An unsigned integer, written with a `u` suffix (`12u`).
    UInteger(u64),
    /// A boolean (`t`, `true`, `F`, `FALSE`, ...).
    Boolean(bool),
    /// A double-quoted string, unescaped.
    String(Cow<'a, str>),
}

/// A rejected line: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the body.
    pub line: usize,
    /// 1-based column, counted in characters (not bytes) from the start of the line.
    pub column: usize,
    /// What is wrong, naming the tag or field key where there is one.
    pub message: String,
    /// The offending line (lossy UTF-8), truncated to 200 characters plus "..." when longer.
    pub text: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for LineError {}

/// Iterator over a body's lines: yields Ok for each data line, Err for each bad line; skips blank lines and lines whose first non-whitespace character is '#'.
#[derive(Debug, Clone)]
pub struct Lines<'a> {
    body: &'a [u8],
    pos: usize,
    line_number: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<ParsedLine<'a>, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(rest) = self.body.get(self.pos..).filter(|r| !r.is_empty()) {
            let (line, consumed) = match rest.iter().position(|&c| c == b'\n') {
                Some(n) => (&rest[..n], n + 1),
                None => (rest, rest.len()),
            };
            self.pos += consumed;
            self.line_number += 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match line.iter().find(|&&c| !is_space(c)) {
                None | Some(b'#') => continue,
                Some(_) => return Some(parse_line(line, self.line_number)),
            }
        }
        None
    }
}

impl FusedIterator for Lines<'_> {}

/// Returns an iterator over the data lines of a line-protocol request body.
pub fn parse_lines(body: &[u8]) -> Lines<'_> {
    Lines {
        body,
        pos: 0,
        line_number: 0,
    }
}

/// Parse one line (without its newline); line_number is used for errors.
///
/// Unlike [`parse_lines`], this does not skip comments: a line starting with `#` is
/// read as a measurement whose name starts with `#`.
pub fn parse_line(line: &[u8], line_number: usize) -> Result<ParsedLine<'_>, LineError> {
    let s = utf8(line, line_number)?;
    parse_str(s, line_number, |parsed| parsed)
        .map_err(|f| line_error(line, line_number, f.at, f.message))
}

/// [`parse_line`], pushing the parsed line and its text onto `out` rather than
/// returning it: a parsed line weighs hundreds of bytes, and handing it back
/// through two `Result`s and into the list moved it as many times (a few percent
/// of a write).
pub fn parse_line_onto<'a>(
    line: &'a [u8],
    line_number: usize,
    out: &mut Vec<(&'a [u8], ParsedLine<'a>)>,
) -> Result<(), LineError> {
    let s = utf8(line, line_number)?;
    parse_str(s, line_number, |parsed| out.push((line, parsed)))
        .map_err(|f| line_error(line, line_number, f.at, f.message))
}

/// The line as text, or where it stops being UTF-8.
///
/// SIMD validation: the city's tag values are mostly not ASCII, where the
/// standard library's check goes a byte at a time. Its error says where, as std's.
#[inline]
fn utf8(line: &[u8], line_number: usize) -> Result<&str, LineError> {
    simdutf8::compat::from_utf8(line).map_err(|e| {
        line_error(
            line,
            line_number,
            e.valid_up_to(),
            "line is not valid UTF-8".to_owned(),
        )
    })
}

/// Characters that may be escaped in a measurement name.
pub(crate) const MEASUREMENT_ESCAPES: &[u8] = b", \\";
/// Characters that may be escaped in tag keys, tag values and field keys.
pub(crate) const KEY_ESCAPES: &[u8] = b",= \\";
/// Characters that may be escaped inside a quoted string field value.
pub(crate) const STRING_ESCAPES: &[u8] = b"\"\\";

/// Longest value quoted back in an error message, so a huge bad value can't bloat the error.
const MAX_VALUE_IN_MESSAGE: usize = 100;
/// Longest line text carried in a [`LineError`].
const MAX_TEXT: usize = 200;

/// A parse failure at a byte offset into the line; turned into a [`LineError`] only once,
/// at the edge, so the hot path never touches column counting or line copying.
struct Fail {
    at: usize,
    message: String,
}

fn fail<T>(at: usize, message: String) -> Result<T, Fail> {
    Err(Fail { at, message })
}

fn line_error(line: &[u8], line_number: usize, at: usize, message: String) -> LineError {
    // Count characters by skipping UTF-8 continuation bytes; works on bytes so an offset
    // inside invalid UTF-8 or a multibyte character can never panic.
    let prefix = &line[..at.min(line.len())];
    let column = prefix.iter().filter(|&&c| c & 0xC0 != 0x80).count() + 1;
    let lossy = String::from_utf8_lossy(line);
    let text = match lossy.char_indices().nth(MAX_TEXT) {
        Some((cut, _)) => format!("{}...", &lossy[..cut]),
        None => lossy.into_owned(),
    };
    LineError {
        line: line_number,
        column,
        message,
        text,
    }
}

/// Whitespace allowed before the measurement and at the end of a line.
pub(crate) fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r')
}

/// Scans from `i` to the first unescaped byte of `stops` (or `end`), stepping over
/// every `\x` pair so an escaped delimiter never ends the token. Returns the stop offset
/// and whether any backslash was seen, which lets clean tokens skip unescaping entirely.
///
/// Eight bytes are looked at a time ([`first_of`]): names and values are a few to
/// a few dozen bytes, and a byte at a time this loop was a fifth of parsing.
#[inline]
pub(crate) fn scan<const N: usize>(
    b: &[u8],
    mut i: usize,
    end: usize,
    stops: [u8; N],
) -> (usize, bool) {
    let mut escaped = false;
    while i < end {
        if i + 8 <= end {
            let word = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
            match first_of(word, stops) {
                Some(k) => i += k,
                None => {
                    i += 8;
                    continue;
                }
            }
        }
        let c = b[i];
        if c == b'\\' {
            escaped = true;
            i += 2;
        } else if stops.contains(&c) {
            return (i, escaped);
        } else {
            i += 1;
        }
    }
    (end, escaped)
}

/// The position of the first byte of a little-endian `word` that is a backslash
/// or one of `stops`, if any.
#[inline]
fn first_of<const N: usize>(word: u64, stops: [u8; N]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `word ^ c * ONES` is zero where `word` has `c`. The borrow of the
    // subtraction can mark bytes above a zero byte too, never below the lowest
    // one, so the lowest marked byte of each test (and of their union) is exact.
    let zero_at = |c: u8| {
        let v = word ^ (u64::from(c) * ONES);
        v.wrapping_sub(ONES) & !v & HIGHS
    };
    let marks = stops
        .iter()
        .fold(zero_at(b'\\'), |marks, &c| marks | zero_at(c));
    (marks != 0).then(|| marks.trailing_zeros() as usize / 8)
}

/// Bytes that end a measurement name.
pub(crate) const MEASUREMENT_END: [u8; 2] = [b',', b' '];
/// Bytes that end a tag key, a tag value or a field key.
pub(crate) const KEY_END: [u8; 3] = [b',', b'=', b' '];

/// Removes the backslash from each `\x` with `x` in `escapable`; other backslashes stay.
/// Borrows unless something was actually removed.
#[inline]
pub(crate) fn unescape<'a>(token: &'a str, had_backslash: bool, escapable: &[u8]) -> Cow<'a, str> {
    if had_backslash {
        unescape_pairs(token, escapable)
    } else {
        Cow::Borrowed(token)
    }
}

/// [`unescape`] of a token that has a backslash.
fn unescape_pairs<'a>(token: &'a str, escapable: &[u8]) -> Cow<'a, str> {
    let b = token.as_bytes();
    let mut out: Option<String> = None;
    let mut copied_to = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        if escapable.contains(&b[i + 1]) {
            // Both offsets sit on ASCII bytes, so the slices are on char boundaries.
            let o = out.get_or_insert_with(|| String::with_capacity(token.len()));
            o.push_str(&token[copied_to..i]);
            copied_to = i + 1;
        }
        // Step over the pair either way, matching `scan`: in `\\,` the comma is not escaped.
        i += 2;
    }
    match out {
        Some(mut o) => {
            o.push_str(&token[copied_to..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(token),
    }
}

/// Shortens a value for quoting in an error message.
fn snippet(v: &str) -> Cow<'_, str> {
    match v.char_indices().nth(MAX_VALUE_IN_MESSAGE) {
        Some((cut, _)) => Cow::Owned(format!("{}...", &v[..cut])),
        None => Cow::Borrowed(v),
    }
}

/// Parses a line and hands it to `emit` (the line's place in a list, or the caller).
#[inline(always)]
fn parse_str<'a, R>(
    s: &'a str,
    line_number: usize,
    emit: impl FnOnce(ParsedLine<'a>) -> R,
) -> Result<R, Fail> {
    let b = s.as_bytes();
    // Trailing whitespace is harmless; trimming it up front means no later stage has to
    // tell "end of line" apart from "only spaces left".
    let mut end = b.len();
    while end > 0 && is_space(b[end - 1]) {
        end -= 1;
    }
    let mut pos = 0;
    while pos < end && is_space(b[pos]) {
        pos += 1;
    }

    // All offsets below stop on ASCII delimiters or `end`, so slicing `s` with them is
    // always on a char boundary.
    let (m_end, esc) = scan(b, pos, end, MEASUREMENT_END);
    if m_end == pos {
        return fail(pos, "missing measurement".to_owned());
    }
    let measurement = unescape(&s[pos..m_end], esc, MEASUREMENT_ESCAPES);
    pos = m_end;

    let mut tags = Tags::new();
    while pos < end && b[pos] == b',' {
        let key_start = pos + 1;
        let (key_end, esc) = scan(b, key_start, end, KEY_END);
        if key_end == key_start {
            return fail(key_start, "empty tag key".to_owned());
        }
        let key = unescape(&s[key_start..key_end], esc, KEY_ESCAPES);
        if key_end == end || b[key_end] != b'=' {
            return fail(key_end, format!("missing '=' after tag key {key}"));
        }
        if key == "time" {
            return fail(
                key_start,
                "time is reserved and cannot be used as a tag key".to_owned(),
            );
        }
        if tags.iter().any(|(k, _)| *k == key) {
            return fail(key_start, format!("duplicate tag key {key}"));
        }
        let val_start = key_end + 1;
        let (val_end, esc) = scan(b, val_start, end, KEY_END);
        if val_end == val_start {
            return fail(val_start, format!("empty value for tag {key}"));
        }
        if val_end < end && b[val_end] == b'=' {
            return fail(val_end, format!("unescaped '=' in value of tag {key}"));
        }
        let value = unescape(&s[val_start..val_end], esc, KEY_ESCAPES);
        tags.push((key, value));
        pos = val_end;
    }

    // Here pos is at `end` or at the space that ends the measurement/tags section.
    let section_end = pos;
    while pos < end && b[pos] == b' ' {
        pos += 1;
    }
    if pos == end {
        return fail(section_end, "no fields".to_owned());
    }

    let mut fields = Fields::new();
    loop {
        let key_start = pos;
        let (key_end, esc) = scan(b, key_start, end, KEY_END);
        if key_end == key_start {
            return fail(key_start, "empty field key".to_owned());
        }
        let key = unescape(&s[key_start..key_end], esc, KEY_ESCAPES);
        if key_end == end || b[key_end] != b'=' {
            return fail(key_end, format!("missing '=' after field key {key}"));
        }
        if key == "time" {
            return fail(
                key_start,
                "time is reserved and cannot be used as a field key".to_owned(),
            );
        }
        if tags.iter().any(|(k, _)| *k == key) {
            return fail(
                key_start,
                format!("key {key} is used as both a tag and a field"),
            );
        }
        let val_start = key_end + 1;
        let value;
        if val_start < end && b[val_start] == b'"' {
            let (close, esc) = scan(b, val_start + 1, end, [b'"']);
            if close == end {
                return fail(
                    val_start,
                    format!("unterminated string value for field {key}"),
                );
            }
            value = FieldValue::String(unescape(&s[val_start + 1..close], esc, STRING_ESCAPES));
            pos = close + 1;
            if pos < end && b[pos] != b',' && b[pos] != b' ' {
                return fail(
                    pos,
                    format!("unexpected text after string value of field {key}"),
                );
            }
        } else {
            let val_end = b[val_start..end]
                .iter()
                .position(|&c| c == b',' || c == b' ')
                .map_or(end, |n| val_start + n);
            if val_end == val_start {
                return fail(val_start, format!("missing value for field {key}"));
            }
            value = match parse_unquoted(&s[val_start..val_end], &key) {
                Ok(v) => v,
                Err(message) => return fail(val_start, message),
            };
            pos = val_end;
        }
        fields.push((key, value));
        if pos < end && b[pos] == b',' {
            pos += 1;
        } else {
            break;
        }
    }

    while pos < end && b[pos] == b' ' {
        pos += 1;
    }
    let timestamp = if pos == end {
        None
    } else {
        let ts_start = pos;
        let ts_end = b[ts_start..end]
            .iter()
            .position(|&c| c == b' ')
            .map_or(end, |n| ts_start + n);
        let ts = &s[ts_start..ts_end];
        let parsed = if ts.starts_with('+') {
            None
        } else {
            match ts.parse::<i64>() {
                Ok(v) => Some(v),
                Err(e) if is_overflow(&e) => {
                    return fail(
                        ts_start,
                        format!("timestamp out of range: {:?}", snippet(ts)),
                    );
                }
                Err(_) => None,
            }
        };
        let Some(ts_value) = parsed else {
            return fail(
                ts_start,
                format!("invalid timestamp {:?} (expected an integer)", snippet(ts)),
            );
        };
        pos = ts_end;
        while pos < end && b[pos] == b' ' {
            pos += 1;
        }
        if pos < end {
            return fail(pos, "unexpected text after timestamp".to_owned());
        }
        Some(ts_value)
    };

    Ok(emit(ParsedLine {
        line_number,
        measurement,
        tags,
        fields,
        timestamp,
    }))
}

fn is_overflow(e: &std::num::ParseIntError) -> bool {
    matches!(
        e.kind(),
        std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow
    )
}

/// Types an unquoted field value by its syntax; the error is the full message.
pub(crate) fn parse_unquoted<'a>(v: &str, key: &str) -> Result<FieldValue<'a>, String> {
    let b = v.as_bytes();
    // Only something that starts like a number is read as a suffixed integer, so a
    // misspelt word such as `tru` is reported as what it most likely was meant to be.
    let numeric_start =
        matches!(b.first(), Some(c) if c.is_ascii_digit() || *c == b'-' || *c == b'+');
    match b.last() {
        Some(b'i') if numeric_start => {
            let digits = &v[..v.len() - 1];
            // The std parser takes a leading '+', line protocol does not.
            match digits.parse::<i64>() {
                Ok(n) if !digits.starts_with('+') => return Ok(FieldValue::Integer(n)),
                Err(e) if is_overflow(&e) => {
                    return Err(format!(
                        "integer value out of range for field {key}: {:?}",
                        snippet(v)
                    ));
                }
                _ => {
                    return Err(format!(
                        "invalid integer value for field {key}: {:?}",
                        snippet(v)
                    ));
                }
            }
        }
        Some(b'u') if numeric_start => {
            let digits = &v[..v.len() - 1];
            match digits.parse::<u64>() {
                Ok(n) if !digits.starts_with('+') => return Ok(FieldValue::UInteger(n)),
                Err(e) if is_overflow(&e) => {
                    return Err(format!(
                        "unsigned integer value out of range for field {key}: {:?}",
                        snippet(v)
                    ));
                }
                _ => {
                    return Err(format!(
                        "invalid unsigned integer value for field {key}: {:?}",
                        snippet(v)
                    ));
                }
            }
        }
        _ => {}
    }
    match v {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Boolean(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Boolean(false)),
        _ => {}
    }
    // Rust's f64 parser also takes "inf", "infinity" and "nan"; allowing only the
    // characters of decimal/exponent syntax shuts those out before it runs.
    if !b
        .iter()
        .all(|&c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        let unsigned = v.strip_prefix(['+', '-']).unwrap_or(v);
        if ["nan", "inf", "infinity"]
            .iter()
            .any(|w| unsigned.eq_ignore_ascii_case(w))
        {
            return Err(format!(
                "line protocol has no NaN or infinity (field {key}: {:?})",
                snippet(v)
            ));
        }
        let looks_boolean = ["true", "false"]
            .iter()
            .any(|w| w.len() >= v.len() && w.as_bytes()[..v.len()].eq_ignore_ascii_case(b));
        if looks_boolean {
            return Err(format!(
                "invalid boolean value for field {key}: {:?} (use t, T, true, True, TRUE, f, F, false, False or FALSE)",
                snippet(v)
            ));
        }
        return Err(format!(
            "invalid float value for field {key}: {:?}",
            snippet(v)
        ));
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(FieldValue::Float(x)),
        Ok(_) => Err(format!(
            "float value out of range for field {key}: {:?}",
            snippet(v)
        )),
        Err(_) => Err(format!(
            "invalid float value for field {key}: {:?}",
            snippet(v)
        )),
    }
}

#[cfg(test)]
pub(crate) mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> ParsedLine<'_> {
        match parse_line(line.as_bytes(), 1) {
            Ok(p) => p,
            Err(e) => panic!("{line:?} should parse, got {e}"),
        }
    }

    fn err(line: &str) -> LineError {
        match parse_line(line.as_bytes(), 1) {
            Ok(p) => panic!("{line:?} should fail, got {p:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's column and exact message.
    fn check_err(line: &str, column: usize, message: &str) {
        let e = err(line);
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (1, column, message),
            "for {line:?}"
        );
        assert_eq!(e.text, line);
    }

    fn field<'p, 'a>(p: &'p ParsedLine<'a>, key: &str) -> &'p FieldValue<'a> {
        match p.fields.iter().rev().find(|(k, _)| k == key) {
            Some((_, v)) => v,
            None => panic!("no field {key} in {p:?}"),
        }
    }

    fn value(v: &str) -> FieldValue<'static> {
        let line = format!("m f={v}");
        let parsed = parse_line(line.as_bytes(), 1);
        match parsed {
            Ok(p) => match &p.fields[0].1 {
                FieldValue::String(_) => panic!("unexpected string"),
                FieldValue::Float(x) => FieldValue::Float(*x),
                FieldValue::Integer(x) => FieldValue::Integer(*x),
                FieldValue::UInteger(x) => FieldValue::UInteger(*x),
                FieldValue::Boolean(x) => FieldValue::Boolean(*x),
            },
            Err(e) => panic!("{v:?} should parse, got {e}"),
        }
    }

    #[test]
    fn full_line() {
        let p = ok(
            "weather,city=zhengzhou,station=s1 temp=21.5,count=3i,ok=t,note=\"hi\" 1700000000000000000",
        );
        assert_eq!(p.line_number, 1);
        assert_eq!(p.measurement, "weather");
        assert_eq!(
            p.tags[..],
            [
                (Cow::from("city"), Cow::from("zhengzhou")),
                (Cow::from("station"), Cow::from("s1")),
            ]
        );
        assert_eq!(
            p.fields[..],
            [
                (Cow::from("temp"), FieldValue::Float(21.5)),
                (Cow::from("count"), FieldValue::Integer(3)),
                (Cow::from("ok"), FieldValue::Boolean(true)),
                (Cow::from("note"), FieldValue::String(Cow::from("hi"))),
            ]
        );
        assert_eq!(p.timestamp, Some(1_700_000_000_000_000_000));
    }

    #[test]
    fn tags_keep_written_order() {
        let p = ok("m,z=1,a=2,m=3 f=1");
        let keys: Vec<&str> = p.tags.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn no_tags_no_timestamp() {
        let p = ok("m f=1");
        assert!(p.tags.is_empty());
        assert_eq!(p.timestamp, None);
    }

    #[test]
    fn clean_tokens_are_borrowed() {
        let p = ok("m,k=v f=\"s\" 1");
        assert!(matches!(p.measurement, Cow::Borrowed(_)));
        assert!(matches!(p.tags[0].0, Cow::Borrowed(_)) && matches!(p.tags[0].1, Cow::Borrowed(_)));
        assert!(matches!(p.fields[0].0, Cow::Borrowed(_)));
        assert!(matches!(
            &p.fields[0].1,
            FieldValue::String(Cow::Borrowed("s"))
        ));
        // A backslash that escapes nothing is kept, so the token still borrows.
        let p = ok(r"m\x,k=a\b f=1");
        assert_eq!(p.measurement, r"m\x");
        assert!(matches!(p.measurement, Cow::Borrowed(_)));
        assert_eq!(p.tags[0].1, r"a\b");
        assert!(matches!(p.tags[0].1, Cow::Borrowed(_)));
    }

    #[test]
    fn escaped_measurement() {
        let p = ok(r"my\ table\,x f=1");
        assert_eq!(p.measurement, "my table,x");
        assert!(!matches!(p.measurement, Cow::Borrowed(_)));
        assert_eq!(ok(r"a\\b f=1").measurement, r"a\b");
        // '=' is not special in a measurement, so `\=` stays as written.
        assert_eq!(ok(r"a\=b f=1").measurement, r"a\=b");
        assert_eq!(ok("a=b f=1").measurement, "a=b");
        // `\\` is one escape, so the following comma ends the measurement.
        let p = ok(r"a\\,k=v f=1");
        assert_eq!(p.measurement, r"a\");
        assert_eq!(p.tags[0].0, "k");
    }

    #[test]
    fn escaped_tags() {
        let p = ok(r"m,ta\ g\=k=v\,1\ 2\=3 f=1");
        assert_eq!(p.tags[0].0, "ta g=k");
        assert_eq!(p.tags[0].1, "v,1 2=3");
        let p = ok(r"m,k=a\\ f=1");
        assert_eq!(p.tags[0].1, r"a\");
        assert_eq!(p.fields[0].0, "f");
        // A backslash before a multibyte character is literal and must not split it.
        let p = ok(r"m,k=\金 f=1");
        assert_eq!(p.tags[0].1, r"\金");
    }

    #[test]
    fn escaped_field_key() {
        let p = ok(r"m f\ 1\,x\=y=1");
        assert_eq!(p.fields[0].0, "f 1,x=y");
    }

    #[test]
    fn string_values() {
        let p = ok(r#"m s="a \"quoted\" value, with = and \\ backslash",u="金水区 区",e="""#);
        assert_eq!(
            field(&p, "s"),
            &FieldValue::String(Cow::from(r#"a "quoted" value, with = and \ backslash"#))
        );
        assert_eq!(field(&p, "u"), &FieldValue::String(Cow::from("金水区 区")));
        assert_eq!(field(&p, "e"), &FieldValue::String(Cow::from("")));
        // Other backslashes are literal.
        let p = ok(r#"m s="a\nb\,c" 5"#);
        assert_eq!(field(&p, "s"), &FieldValue::String(Cow::from(r"a\nb\,c")));
        assert_eq!(p.timestamp, Some(5));
        let p = ok(r#"m s="ends with \\""#);
        assert_eq!(
            field(&p, "s"),
            &FieldValue::String(Cow::from(r"ends with \"))
        );
        // Something that looks like more fields inside a string stays in the string.
        let p = ok(r#"m s="x=1,y=2 3" 4"#);
        assert_eq!(p.fields.len(), 1);
        assert_eq!(p.timestamp, Some(4));
    }

    #[test]
    fn booleans() {
        for t in ["t", "T", "true", "True", "TRUE"] {
            assert_eq!(value(t), FieldValue::Boolean(true), "{t}");
        }
        for f in ["f", "F", "false", "False", "FALSE"] {
            assert_eq!(value(f), FieldValue::Boolean(false), "{f}");
        }
    }

    #[test]
    fn bad_booleans() {
        check_err(
            "m b=tRuE",
            5,
            "invalid boolean value for field b: \"tRuE\" (use t, T, true, True, TRUE, f, F, false, False or FALSE)",
        );
        check_err("m b=yes", 5, "invalid float value for field b: \"yes\"");
        check_err(
            "m b=tru",
            5,
            "invalid boolean value for field b: \"tru\" (use t, T, true, True, TRUE, f, F, false, False or FALSE)",
        );
        check_err(
            "m b=Fals",
            5,
            "invalid boolean value for field b: \"Fals\" (use t, T, true, True, TRUE, f, F, false, False or FALSE)",
        );
    }

    #[test]
    fn floats() {
        let cases: [(&str, f64); 10] = [
            ("1", 1.0),
            ("-1.5", -1.5),
            ("1e3", 1000.0),
            ("1.5E-3", 0.0015),
            (".5", 0.5),
            ("+1", 1.0),
            ("1.", 1.0),
            ("-0", -0.0),
            ("1.7976931348623157e308", f64::MAX),
            ("0.000", 0.0),
        ];
        for (text, x) in cases {
            assert_eq!(value(text), FieldValue::Float(x), "{text}");
        }
    }

    #[test]
    fn bad_floats() {
        check_err(
            "m,a=b tilt_deg=abc",
            16,
            "invalid float value for field tilt_deg: \"abc\"",
        );
        check_err("m f=1.2.3", 5, "invalid float value for field f: \"1.2.3\"");
        check_err("m f=-", 5, "invalid float value for field f: \"-\"");
        check_err("m f=1e", 5, "invalid float value for field f: \"1e\"");
        check_err("m f=1_000", 5, "invalid float value for field f: \"1_000\"");
        check_err("m f=0x10", 5, "invalid float value for field f: \"0x10\"");
        check_err(
            "m f=1e999",
            5,
            "float value out of range for field f: \"1e999\"",
        );
        check_err("m g=1,f=a=b", 9, "invalid float value for field f: \"a=b\"");
    }

    #[test]
    fn nan_and_infinity_rejected() {
        for v in [
            "NaN",
            "nan",
            "NAN",
            "-nan",
            "inf",
            "-inf",
            "+Inf",
            "INF",
            "Infinity",
            "-infinity",
            "INFINITY",
        ] {
            check_err(
                &format!("m f={v}"),
                5,
                &format!("line protocol has no NaN or infinity (field f: \"{v}\")"),
            );
        }
    }

    #[test]
    fn integers() {
        assert_eq!(value("123i"), FieldValue::Integer(123));
        assert_eq!(value("-123i"), FieldValue::Integer(-123));
        assert_eq!(value("0i"), FieldValue::Integer(0));
        assert_eq!(value("9223372036854775807i"), FieldValue::Integer(i64::MAX));
        assert_eq!(
            value("-9223372036854775808i"),
            FieldValue::Integer(i64::MIN)
        );
    }

    #[test]
    fn bad_integers() {
        check_err(
            "m f=9223372036854775808i",
            5,
            "integer value out of range for field f: \"9223372036854775808i\"",
        );
        check_err(
            "m f=-9223372036854775809i",
            5,
            "integer value out of range for field f: \"-9223372036854775809i\"",
        );
        check_err("m f=+1i", 5, "invalid integer value for field f: \"+1i\"");
        check_err("m f=1.5i", 5, "invalid integer value for field f: \"1.5i\"");
        check_err("m f=i", 5, "invalid float value for field f: \"i\"");
        check_err("m f=-i", 5, "invalid integer value for field f: \"-i\"");
        check_err(
            "m f=1 i",
            7,
            "invalid timestamp \"i\" (expected an integer)",
        );
    }

    #[test]
    fn unsigned() {
        assert_eq!(value("0u"), FieldValue::UInteger(0));
        assert_eq!(value("123u"), FieldValue::UInteger(123));
        assert_eq!(
            value("18446744073709551615u"),
            FieldValue::UInteger(u64::MAX)
        );
        check_err(
            "m f=18446744073709551616u",
            5,
            "unsigned integer value out of range for field f: \"18446744073709551616u\"",
        );
        check_err(
            "m f=-1u",
            5,
            "invalid unsigned integer value for field f: \"-1u\"",
        );
        check_err(
            "m f=+1u",
            5,
            "invalid unsigned integer value for field f: \"+1u\"",
        );
        check_err("m f=u", 5, "invalid float value for field f: \"u\"");
        check_err("m f=12x", 5, "invalid float value for field f: \"12x\"");
    }

    #[test]
    fn timestamps() {
        assert_eq!(ok("m f=1").timestamp, None);
        assert_eq!(ok("m f=1 0").timestamp, Some(0));
        assert_eq!(ok("m f=1 -1700").timestamp, Some(-1700));
        assert_eq!(ok("m f=1 9223372036854775807").timestamp, Some(i64::MAX));
        assert_eq!(ok("m f=1 -9223372036854775808").timestamp, Some(i64::MIN));
    }

    #[test]
    fn bad_timestamps() {
        check_err(
            "m f=1 12a",
            7,
            "invalid timestamp \"12a\" (expected an integer)",
        );
        check_err(
            "m f=1 1.5",
            7,
            "invalid timestamp \"1.5\" (expected an integer)",
        );
        check_err(
            "m f=1 +5",
            7,
            "invalid timestamp \"+5\" (expected an integer)",
        );
        check_err(
            "m f=1 -",
            7,
            "invalid timestamp \"-\" (expected an integer)",
        );
        check_err(
            "m f=1 9223372036854775808",
            7,
            "timestamp out of range: \"9223372036854775808\"",
        );
        check_err("m f=1 123 456", 11, "unexpected text after timestamp");
        check_err("m f=1  123   x", 14, "unexpected text after timestamp");
    }

    #[test]
    fn extra_spaces_between_sections_and_trailing_whitespace() {
        let p = ok("m,k=v   f=1    123   \t");
        assert_eq!(p.tags.len(), 1);
        assert_eq!(p.fields[0].1, FieldValue::Float(1.0));
        assert_eq!(p.timestamp, Some(123));
        assert_eq!(ok("m f=1 \t ").timestamp, None);
        assert_eq!(ok("  \tm f=1").measurement, "m");
    }

    #[test]
    fn missing_measurement() {
        check_err(",k=v f=1", 1, "missing measurement");
        check_err("  ,k=v f=1", 3, "missing measurement");
        check_err("", 1, "missing measurement");
        check_err("   ", 1, "missing measurement");
    }

    #[test]
    fn no_fields() {
        check_err("m", 2, "no fields");
        check_err("m,k=v", 6, "no fields");
        check_err("m,k=v  ", 6, "no fields");
        check_err("m ", 2, "no fields");
        // Without the space, what was meant as a field is one more tag.
        check_err("m,k=v,f=1", 10, "no fields");
    }

    #[test]
    fn missing_equals() {
        check_err("m,k f=1", 4, "missing '=' after tag key k");
        check_err("m,k,j=1 f=1", 4, "missing '=' after tag key k");
        check_err("m f", 4, "missing '=' after field key f");
        check_err("m f 1", 4, "missing '=' after field key f");
        check_err("m f=1,g", 8, "missing '=' after field key g");
        check_err("m f=1,g,h=2", 8, "missing '=' after field key g");
    }

    #[test]
    fn empty_keys_and_values() {
        check_err("m,=v f=1", 3, "empty tag key");
        check_err("m,k=v, f=1", 7, "empty tag key");
        check_err("m,k= f=1", 5, "empty value for tag k");
        check_err("m,k=,j=1 f=1", 5, "empty value for tag k");
        check_err("m,k=v=x f=1", 6, "unescaped '=' in value of tag k");
        check_err("m =1", 3, "empty field key");
        check_err("m f=1,=2", 7, "empty field key");
        check_err("m f=1,", 7, "empty field key");
        check_err("m f=1, g=2", 7, "empty field key");
        check_err("m f=", 5, "missing value for field f");
        check_err("m f=,g=1", 5, "missing value for field f");
        check_err("m f= 1", 5, "missing value for field f");
    }

    #[test]
    fn duplicate_tags_rejected_duplicate_fields_kept() {
        check_err("m,a=1,a=2 f=1", 7, "duplicate tag key a");
        // Compared after unescaping.
        check_err(r"m,a\ b=1,a\ b=2 f=1", 10, r"duplicate tag key a b");
        let p = ok("m f=1,f=2i");
        assert_eq!(p.fields.len(), 2);
        assert_eq!(field(&p, "f"), &FieldValue::Integer(2));
    }

    #[test]
    fn time_is_reserved() {
        check_err(
            "m,time=1 f=1",
            3,
            "time is reserved and cannot be used as a tag key",
        );
        check_err(
            "m f=1,time=1",
            7,
            "time is reserved and cannot be used as a field key",
        );
        assert_eq!(ok("m,times=1 timer=1").tags[0].0, "times");
    }

    #[test]
    fn tag_and_field_with_same_key() {
        check_err(
            "m,k=v f=1,k=1",
            11,
            "key k is used as both a tag and a field",
        );
    }

    #[test]
    fn unterminated_string() {
        check_err("m s=\"abc", 5, "unterminated string value for field s");
        check_err(r#"m s="abc\""#, 5, "unterminated string value for field s");
        check_err(
            "m f=1,s=\"a,b c",
            9,
            "unterminated string value for field s",
        );
        check_err("m s=\"", 5, "unterminated string value for field s");
        // A newline always ends the record, even inside quotes.
        let out: Vec<_> = parse_lines(b"m s=\"abc\ndef\" f=1\nm f=2").collect();
        assert_eq!(out.len(), 3);
        let e = out[0].clone().unwrap_err();
        assert_eq!((e.line, e.column), (1, 5));
        assert_eq!(e.message, "unterminated string value for field s");
        assert_eq!(out[2].as_ref().map(|p| p.line_number), Ok(3));
    }

    #[test]
    fn text_after_string() {
        check_err(
            "m s=\"a\"x",
            8,
            "unexpected text after string value of field s",
        );
        check_err(
            "m s=\"a\"\"b\"",
            8,
            "unexpected text after string value of field s",
        );
    }

    #[test]
    fn utf8_values_and_columns() {
        let p = ok("温度,district=金水区 值=1.5,描述=\"晴 天\" 1");
        assert_eq!(p.measurement, "温度");
        assert_eq!(p.tags[0], (Cow::from("district"), Cow::from("金水区")));
        assert_eq!(p.fields[0], (Cow::from("值"), FieldValue::Float(1.5)));
        assert_eq!(field(&p, "描述"), &FieldValue::String(Cow::from("晴 天")));
        // Columns count characters, not bytes.
        check_err(
            "m,district=金水区 f=abc",
            18,
            "invalid float value for field f: \"abc\"",
        );
        check_err(
            "测量 f=1 bad",
            8,
            "invalid timestamp \"bad\" (expected an integer)",
        );
        check_err(
            "m,区=金水区 区=1",
            9,
            "key 区 is used as both a tag and a field",
        );
    }

    #[test]
    fn invalid_utf8_fails_only_its_line() {
        let body = b"m f=1\nm,k=\xff\xfe f=1\nm,\xc3\xa9=\xe9 f=1\nm f=2\n";
        let out: Vec<_> = parse_lines(body).collect();
        assert_eq!(out.len(), 4);
        assert!(out[0].is_ok());
        let e = out[1].clone().unwrap_err();
        assert_eq!((e.line, e.column), (2, 5));
        assert_eq!(e.message, "line is not valid UTF-8");
        assert_eq!(e.text, "m,k=\u{fffd}\u{fffd} f=1");
        // The column counts the valid two-byte 'é' as one character.
        let e = out[2].clone().unwrap_err();
        assert_eq!((e.line, e.column), (3, 5));
        assert_eq!(out[3].as_ref().map(|p| p.line_number), Ok(4));
    }

    #[test]
    fn crlf() {
        let out: Vec<_> = parse_lines(b"m f=1\r\nm s=\"x\" 5\r\n\r\nm f=2i\r")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].fields[0].1, FieldValue::String(Cow::from("x")));
        assert_eq!(out[1].timestamp, Some(5));
        assert_eq!(out[2].line_number, 4);
        assert_eq!(out[2].fields[0].1, FieldValue::Integer(2));
    }

    #[test]
    fn comments_and_blank_lines_count() {
        let body = b"\n# comment\n   # indented comment\n\t \nm f=1\n\n  m f=2\nbad\n#x f=1";
        let out: Vec<_> = parse_lines(body).collect();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().map(|p| p.line_number), Ok(5));
        assert_eq!(out[1].as_ref().map(|p| p.line_number), Ok(7));
        let e = out[2].clone().unwrap_err();
        assert_eq!((e.line, e.column, e.message.as_str()), (8, 4, "no fields"));
        assert_eq!(e.text, "bad");
        assert_eq!(parse_lines(b"").count(), 0);
        assert_eq!(parse_lines(b"\n\n\n").count(), 0);
        // parse_line on its own does not treat '#' specially.
        assert_eq!(ok("#m f=1").measurement, "#m");
    }

    #[test]
    fn iterator_is_fused() {
        let mut lines = parse_lines(b"m f=1");
        assert!(lines.next().is_some());
        assert!(lines.next().is_none());
        assert!(lines.next().is_none());
    }

    #[test]
    fn display() {
        let e = err("m");
        assert_eq!(e.to_string(), "line 1, column 2: no fields");
        let e = parse_line(b"m f=x", 42).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 42, column 5: invalid float value for field f: \"x\""
        );
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(boxed.to_string().starts_with("line 42"));
    }

    #[test]
    fn long_lines_are_truncated_in_errors() {
        let line = format!("m f=1 {}", "金".repeat(300));
        let e = err(&line);
        assert_eq!(e.column, 7);
        assert_eq!(e.text.chars().count(), 203);
        assert!(e.text.ends_with("金..."));
        assert!(e.text.starts_with("m f=1 金"));
        assert!(e.message.len() < 500, "{}", e.message);
        assert!(e.message.ends_with("...\" (expected an integer)"));
        // Exactly 200 characters is not truncated.
        let line = format!("m {}", "x".repeat(198));
        assert_eq!(err(&line).text, line);
    }

    #[test]
    fn parsing_onto_a_list_pushes_what_parsing_returns() {
        let lines: [&[u8]; 7] = [
            b"manhole,device=mh-1,district=\xe9\x87\x91 tilt_deg=0.5,open=false 1767225600",
            b"m,t=a\\ b f=\"x \\\" y\",i=-3i,u=4u",
            b"m f=1 1 2",
            b"m,t= f=1",
            b"\xff f=1",
            b"m  f=1i   ",
            b"parking,device=pk-2,street=Zhongzhou\\ Ave occupied=51i,capacity=174i 1",
        ];
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let pushed = parse_line_onto(line, i + 1, &mut out);
            match parse_line(line, i + 1) {
                Ok(parsed) => {
                    assert_eq!(pushed, Ok(()));
                    assert_eq!(out.last(), Some(&(*line, parsed)));
                }
                Err(e) => assert_eq!(pushed, Err(e)),
            }
        }
        assert_eq!(out.len(), 4);
    }

    /// The byte-at-a-time scan the word-at-a-time one must agree with.
    fn scan_bytewise(b: &[u8], mut i: usize, end: usize, stops: &[u8]) -> (usize, bool) {
        let mut escaped = false;
        while i < end {
            if b[i] == b'\\' {
                escaped = true;
                i += 2;
            } else if stops.contains(&b[i]) {
                return (i, escaped);
            } else {
                i += 1;
            }
        }
        (end, escaped)
    }

    proptest::proptest! {
        /// Eight bytes at a time, the scan stops where a byte at a time does, with
        /// delimiters and backslashes at every position of a word, escapes that
        /// straddle words, multi-byte characters, and ends short of the slice.
        #[test]
        fn the_word_scan_stops_where_the_byte_scan_does(
            bytes in proptest::collection::vec(
                proptest::sample::select(b"ab,= \\\"\xe5\x8c\xba\x80".to_vec()),
                0..40,
            ),
            start in 0usize..40,
            cut in 0usize..40,
        ) {
            let end = bytes.len().saturating_sub(cut);
            let start = start.min(end);
            proptest::prop_assert_eq!(
                scan(&bytes, start, end, KEY_END),
                scan_bytewise(&bytes, start, end, &KEY_END)
            );
            proptest::prop_assert_eq!(
                scan(&bytes, start, end, MEASUREMENT_END),
                scan_bytewise(&bytes, start, end, &MEASUREMENT_END)
            );
            proptest::prop_assert_eq!(
                scan(&bytes, start, end, [b'"']),
                scan_bytewise(&bytes, start, end, b"\"")
            );
        }
    }
}
