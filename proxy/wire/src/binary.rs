//! Text to binary output format for merged values.
//!
//! The merger reads the shards' rows in text (its comparisons and partial
//! aggregates work on PostgreSQL's text output) and, for an extended-protocol
//! client that asked for binary results, sends each value in the binary
//! format PostgreSQL's `*send` function would produce for the same value.
//! Types without a conversion here are refused before the first row, with
//! the type named: never a value in the wrong format.
//!
//! Date and time values must be in `DateStyle` ISO (the default); other
//! styles are refused per value.

use bytes::{BufMut, Bytes, BytesMut};

/// Whether values of type `oid` can be sent in binary.
pub fn supported(oid: u32) -> bool {
    matches!(
        oid,
        16 | 17
            | 19
            | 20
            | 21
            | 23
            | 25
            | 26
            | 114
            | 700
            | 701
            | 705
            | 1042
            | 1043
            | 1082
            | 1114
            | 1184
            | 1700
            | 2950
            | 3802
    )
}

/// PostgreSQL's binary form of the value whose text output is `text`.
pub fn to_binary(oid: u32, text: &[u8]) -> Result<Bytes, String> {
    let s = || std::str::from_utf8(text).map_err(|_| "invalid UTF-8".to_string());
    let bad = |what: &str| {
        format!(
            "cannot convert {what} value {:?} to binary",
            String::from_utf8_lossy(text)
        )
    };
    let mut out = BytesMut::new();
    match oid {
        16 => match text {
            b"t" => out.put_u8(1),
            b"f" => out.put_u8(0),
            _ => return Err(bad("boolean")),
        },
        17 => {
            let hex = text
                .strip_prefix(b"\\x")
                .ok_or_else(|| "bytea in binary needs bytea_output = hex".to_string())?;
            out.put_slice(&unhex(hex).ok_or_else(|| bad("bytea"))?);
        }
        19 | 25 | 114 | 705 | 1042 | 1043 => out.put_slice(text),
        3802 => {
            out.put_u8(1);
            out.put_slice(text);
        }
        20 => out.put_i64(s()?.parse().map_err(|_| bad("bigint"))?),
        21 => out.put_i16(s()?.parse().map_err(|_| bad("smallint"))?),
        23 => out.put_i32(s()?.parse().map_err(|_| bad("integer"))?),
        26 => out.put_u32(s()?.parse().map_err(|_| bad("oid"))?),
        700 => out.put_f32(parse_float(s()?).ok_or_else(|| bad("real"))? as f32),
        701 => out.put_f64(parse_float(s()?).ok_or_else(|| bad("double precision"))?),
        1700 => numeric(s()?, &mut out).ok_or_else(|| bad("numeric"))?,
        2950 => {
            let hex: Vec<u8> = text.iter().copied().filter(|&c| c != b'-').collect();
            let b = unhex(&hex)
                .filter(|b| b.len() == 16)
                .ok_or_else(|| bad("uuid"))?;
            out.put_slice(&b);
        }
        1082 => {
            let v = date_days(s()?).ok_or_else(|| bad("date (DateStyle must be ISO)"))?;
            out.put_i32(v);
        }
        1114 => {
            let v = timestamp_us(s()?, false)
                .ok_or_else(|| bad("timestamp (DateStyle must be ISO)"))?;
            out.put_i64(v);
        }
        1184 => {
            let v = timestamp_us(s()?, true)
                .ok_or_else(|| bad("timestamptz (DateStyle must be ISO)"))?;
            out.put_i64(v);
        }
        other => return Err(format!("no binary output for type OID {other}")),
    }
    Ok(out.freeze())
}

fn unhex(h: &[u8]) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    h.chunks(2)
        .map(|p| Some(d(p[0])? << 4 | d(p[1])?))
        .collect()
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// numeric_send: ndigits, weight, sign, dscale, base-10000 digits.
fn numeric(s: &str, out: &mut BytesMut) -> Option<()> {
    let special = match s {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        out.put_i16(0);
        out.put_i16(0);
        out.put_u16(sign);
        out.put_u16(0);
        return Some(());
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let dscale = u16::try_from(frac.len()).ok()?;
    // Integer part in groups of 4 from the point leftwards, fraction
    // rightwards.
    let pad_left = (4 - int.len() % 4) % 4;
    let int_digits: Vec<u8> = std::iter::repeat_n(b'0', pad_left)
        .chain(int.bytes())
        .collect();
    let pad_right = (4 - frac.len() % 4) % 4;
    let frac_digits: Vec<u8> = frac
        .bytes()
        .chain(std::iter::repeat_n(b'0', pad_right))
        .collect();
    let group = |c: &[u8]| c.iter().fold(0i16, |a, &d| a * 10 + i16::from(d - b'0'));
    let mut digits: Vec<i16> = int_digits.chunks(4).map(group).collect();
    let mut weight = digits.len() as i32 - 1;
    digits.extend(frac_digits.chunks(4).map(group));
    let lead = digits.iter().take_while(|&&d| d == 0).count();
    digits.drain(..lead);
    weight -= lead as i32;
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(i16::try_from(digits.len()).ok()?);
    out.put_i16(i16::try_from(weight).ok()?);
    out.put_u16(if neg && !digits.is_empty() { 0x4000 } else { 0 });
    out.put_u16(dscale);
    for d in digits {
        out.put_i16(d);
    }
    Some(())
}

/// Days from 1970-01-01 of a proleptic Gregorian date (astronomical year).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// 2000-01-01 in days from 1970-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// `YYYY-MM-DD[ BC]` → days from 2000-01-01 (infinity as PostgreSQL's
/// sentinels).
fn date_days(s: &str) -> Option<i32> {
    match s {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(x) => (x, true),
        None => (s, false),
    };
    let days = ymd(s, bc)?;
    i32::try_from(days - PG_EPOCH_DAYS).ok()
}

fn ymd(s: &str, bc: bool) -> Option<i64> {
    let mut p = s.splitn(3, '-');
    let (y, m, d) = (p.next()?, p.next()?, p.next()?);
    if y.len() < 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let num = |x: &str| -> Option<i64> {
        if x.bytes().all(|c| c.is_ascii_digit()) {
            x.parse().ok()
        } else {
            None
        }
    };
    let (mut y, m, d) = (num(y)?, num(m)?, num(d)?);
    // Wider than anything PostgreSQL prints; keeps the arithmetic in range.
    if y > 10_000_000 || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    if bc {
        y = 1 - y;
    }
    Some(days_from_civil(y, m, d))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` → microseconds from
/// 2000-01-01 00:00 (UTC for timestamptz).
fn timestamp_us(s: &str, tz: bool) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(x) => (x, true),
        None => (s, false),
    };
    let (date, rest) = s.split_once(' ')?;
    let days = ymd(date, bc)? - PG_EPOCH_DAYS;
    // The offset starts at the first sign after the time.
    let (time, offset) = if tz {
        let at = rest.find(['+', '-'])?;
        (&rest[..at], Some(&rest[at..]))
    } else {
        (rest, None)
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, m, sec) = (t.next()?, t.next()?, t.next()?);
    if t.next().is_some() || frac.len() > 6 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Time fields are at most two digits (fractions six): no overflow below.
    let p = |x: &str| -> Option<i64> {
        if !x.is_empty() && x.len() <= 6 && x.bytes().all(|c| c.is_ascii_digit()) {
            x.parse().ok()
        } else {
            None
        }
    };
    let mut us = ((p(h)? * 60 + p(m)?) * 60 + p(sec)?) * 1_000_000;
    if !frac.is_empty() {
        us += p(frac)? * 10i64.pow(6 - frac.len() as u32);
    }
    if let Some(o) = offset {
        let neg = o.starts_with('-');
        let mut parts = o[1..].split(':');
        let oh = p(parts.next()?)?;
        let om = parts.next().map(p).unwrap_or(Some(0))?;
        let os = parts.next().map(p).unwrap_or(Some(0))?;
        let off = ((oh * 60 + om) * 60 + os) * 1_000_000;
        // Local = UTC + offset.
        us -= if neg { -off } else { off };
    }
    days.checked_mul(86_400_000_000)?.checked_add(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(oid: u32, s: &str) -> Vec<u8> {
        to_binary(oid, s.as_bytes())
            .map(|b| b.to_vec())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn numeric_like_numeric_send() {
        // ndigits, weight, sign, dscale, digits
        let n = |s: &str| {
            let v = b(1700, s);
            v.chunks(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()
        };
        assert_eq!(n("0"), [0, 0, 0, 0]);
        assert_eq!(n("0.00"), [0, 0, 0, 2]);
        assert_eq!(n("1"), [1, 0, 0, 0, 1]);
        assert_eq!(n("-12345.678"), [3, 1, 0x4000, 3, 1, 2345, 6780]);
        assert_eq!(n("0.0001"), [1, -1, 0, 4, 1]);
        assert_eq!(n("0.00001"), [1, -2, 0, 5, 1000]);
        assert_eq!(n("10000"), [1, 1, 0, 0, 1]);
        assert_eq!(n("NaN"), [0, 0, 0xC000u16 as i16, 0]);
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(date_days("2000-01-01"), Some(0));
        assert_eq!(date_days("1999-12-31"), Some(-1));
        assert_eq!(date_days("2024-02-29"), Some(8825));
        assert_eq!(date_days("0001-01-01 BC"), Some(-730_485));
        assert_eq!(
            timestamp_us("2000-01-01 00:00:01.5", false),
            Some(1_500_000)
        );
        assert_eq!(timestamp_us("2000-01-01 01:00:00+01", true), Some(0));
        assert_eq!(timestamp_us("1999-12-31 19:30:00-04:30", true), Some(0));
        assert_eq!(timestamp_us("01/01/2000 00:00:00", false), None);
    }

    #[test]
    fn scalars() {
        assert_eq!(b(23, "-2"), (-2i32).to_be_bytes());
        assert_eq!(b(701, "NaN"), f64::NAN.to_be_bytes());
        assert_eq!(b(16, "t"), [1]);
        assert_eq!(b(17, "\\x00ff"), [0, 255]);
        assert_eq!(b(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").len(), 16);
        assert!(to_binary(1186, b"1 day").is_err());
    }
}
