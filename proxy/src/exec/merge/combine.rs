//! Combining the shards' rows of a merge: grouping keys, partial
//! aggregates added up, HAVING evaluated, rows compared for ORDER BY,
//! output values produced — each with PostgreSQL's semantics for the type
//! ([`super::value`]).

use super::packed::{put_key_part, Cols, Packed};
use super::value::{self, Num, Ty, ValueError};
use crate::error::sqlstate;
use bytes::Bytes;
use hotrepart_router::route::{
    AggregatePlan, Combined, CompareOp, CountCast, HavingExpr, Literal, MergePlan, Operand,
    Partial, ShardCol,
};
use std::borrow::Cow;
use std::cmp::Ordering;

/// A shard's row, and one column of the shards' RowDescription.
pub(super) use hotrepart_wire::backend::{Field, Row};

pub(super) struct MergeError(pub(super) &'static str, pub(super) String);

impl From<ValueError> for MergeError {
    fn from(e: ValueError) -> Self {
        MergeError(sqlstate::FEATURE_NOT_SUPPORTED, e.0)
    }
}

/// The grouping key of `row` over columns `cols` into `out` (cleared
/// first): per column its [`value::group_key`] (equal values, equal keys).
pub(super) fn key_into<R: Cols + ?Sized>(
    cols: &[usize],
    row: &R,
    types: &[Ty],
    out: &mut Vec<u8>,
) -> Result<(), MergeError> {
    out.clear();
    for &c in cols {
        match row.col(c) {
            None => put_key_part(out, None),
            Some(v) => {
                let ty = types.get(c).copied().unwrap_or(Ty::Other(0));
                put_key_part(out, Some(&value::group_key(ty, v)?));
            }
        }
    }
    Ok(())
}

pub(super) fn too_many(n: usize) -> MergeError {
    MergeError(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("a multi-shard result needs more than max_merge_rows = {n} groups or rows in memory; raise the limit or narrow the query"),
    )
}

pub(super) fn too_big(limit: usize, groups: usize) -> MergeError {
    MergeError(
        sqlstate::OUT_OF_MEMORY,
        format!("out of memory: a multi-shard result needs more than max_merge_bytes = {limit} bytes in memory ({groups} groups or rows held); raise the limit or narrow the query"),
    )
}

pub(super) fn key_ty(v: &Combined, types: &[Ty]) -> Ty {
    match v {
        Combined::Col(c) => types.get(*c).copied().unwrap_or(Ty::Other(0)),
        Combined::Avg { sum, .. } => match types.get(*sum) {
            Some(Ty::Float) => Ty::Float,
            _ => Ty::Numeric,
        },
        Combined::CountAs { to, .. } => Ty::of(count_cast_type(*to).0),
    }
}

/// The type OID and length of a count cast to `to`.
fn count_cast_type(to: CountCast) -> (u32, i16) {
    match to {
        CountCast::Int2 => (21, 2),
        CountCast::Int4 => (23, 4),
        CountCast::Int8 => (20, 8),
        CountCast::Numeric => (1700, -1),
        CountCast::Float8 => (701, 8),
        CountCast::Text => (25, -1),
    }
}

/// The client's column for a combined output; None when the shards
/// answered fewer columns than the plan needs.
pub(super) fn output_field(o: &Combined, fields: &[Field]) -> Option<Field> {
    match o {
        Combined::Col(c) => fields.get(*c).cloned(),
        Combined::Avg { sum, .. } => {
            let mut f = fields.get(*sum)?.clone();
            let float = Ty::of(f.type_oid()) == Ty::Float;
            let (oid, len): (u32, i16) = if float { (701, 8) } else { (1700, -1) };
            f.meta[0..6].fill(0);
            f.meta[6..10].copy_from_slice(&oid.to_be_bytes());
            f.meta[10..12].copy_from_slice(&len.to_be_bytes());
            f.meta[12..16].copy_from_slice(&(-1i32).to_be_bytes());
            Some(f)
        }
        Combined::CountAs { col, to } => {
            let mut f = fields.get(*col)?.clone();
            let (oid, len) = count_cast_type(*to);
            f.meta[0..6].fill(0);
            f.meta[6..10].copy_from_slice(&oid.to_be_bytes());
            f.meta[10..12].copy_from_slice(&len.to_be_bytes());
            f.meta[12..16].copy_from_slice(&(-1i32).to_be_bytes());
            Some(f)
        }
    }
}

/// The value of a combined column in a (combined) shard row.
pub(super) fn combined_value<'a, R: Cols + ?Sized>(
    o: &Combined,
    row: &'a R,
    types: &[Ty],
) -> Result<Option<Cow<'a, [u8]>>, MergeError> {
    match o {
        Combined::Col(c) => Ok(row.col(*c).map(Cow::Borrowed)),
        Combined::Avg { sum, count } => {
            let (Some(sv), Some(cv)) = (row.col(*sum), row.col(*count)) else {
                return Ok(None);
            };
            let cnt = Num::parse(utf8(cv)?)?;
            if cnt.cmp_num(&Num::from_i128(0)) == Ordering::Equal {
                return Ok(None);
            }
            match types.get(*sum) {
                Some(Ty::Float) => {
                    // PostgreSQL's avg accumulates from +0 (so -0 sums to 0).
                    let s: f64 = 0.0 + parse_f64(utf8(sv)?)?;
                    let c: f64 = utf8(cv)?
                        .parse()
                        .map_err(|_| MergeError(sqlstate::INTERNAL_ERROR, "bad count".into()))?;
                    Ok(Some(Cow::Owned(float_text(s / c).into_bytes())))
                }
                _ => {
                    let q = Num::parse(utf8(sv)?)?.div_pg(&cnt)?;
                    Ok(Some(Cow::Owned(q.to_text().into_bytes())))
                }
            }
        }
        Combined::CountAs { col, to } => {
            let Some(v) = row.col(*col) else {
                return Ok(None);
            };
            let text = utf8(v)?;
            let n: i64 = text.parse().map_err(|_| {
                MergeError(sqlstate::INTERNAL_ERROR, format!("invalid count {text:?}"))
            })?;
            let out_of_range =
                |what: &str| MergeError(sqlstate::intern("22003"), format!("{what} out of range"));
            Ok(Some(match to {
                CountCast::Int2 if i16::try_from(n).is_err() => {
                    return Err(out_of_range("smallint"))
                }
                CountCast::Int4 if i32::try_from(n).is_err() => {
                    return Err(out_of_range("integer"))
                }
                CountCast::Float8 => Cow::Owned(float_text(n as f64).into_bytes()),
                _ => Cow::Borrowed(v),
            }))
        }
    }
}

pub(super) fn utf8(b: &[u8]) -> Result<&str, MergeError> {
    std::str::from_utf8(b)
        .map_err(|_| MergeError(sqlstate::INTERNAL_ERROR, "invalid UTF-8 in a value".into()))
}

pub(super) fn parse_f64(s: &str) -> Result<f64, MergeError> {
    match s {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => s
            .parse()
            .map_err(|_| MergeError(sqlstate::INTERNAL_ERROR, format!("invalid float {s:?}"))),
    }
}

/// PostgreSQL's float8 output: shortest round-trip digits, exponent form
/// below 1e-4 and from 1e15.
pub(crate) fn float_text(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let e = format!("{x:e}"); // e.g. "1.2345e14", "-5e-7"
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..15).contains(&exp) {
        format!("{x}")
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// Combines a shard row into its group's row, column by column: the
/// group's new row, or None when no value changed.
pub(super) fn combine<B: AsRef<[u8]>>(
    a: &AggregatePlan,
    types: &[Ty],
    ranks: &Ranks,
    acc: &Packed,
    row: &Packed<B>,
) -> Result<Option<Packed>, MergeError> {
    let mut changed = false;
    let mut owned: Vec<(usize, Bytes)> = Vec::new();
    let mut vals: Vec<Option<&[u8]>> = Vec::with_capacity(acc.len());
    for (i, (old, new)) in acc.values().zip(row.values()).enumerate() {
        let Some(ShardCol::Partial(p)) = a.shard_cols.get(i) else {
            vals.push(old);
            continue;
        };
        let ty = types.get(i).copied().unwrap_or(Ty::Other(0));
        let v = match (old, new) {
            (None, n) => {
                changed |= n.is_some();
                n
            }
            (o, None) => o,
            (Some(o), Some(n)) => match p {
                Partial::Count | Partial::Sum => {
                    let sum = add(if *p == Partial::Count { Ty::Int } else { ty }, o, n)?;
                    changed = true;
                    owned.push((i, sum));
                    None
                }
                Partial::Min | Partial::Max => {
                    let ord = match ranks.of(i) {
                        Some(r) => Ranks::rank(r, o)?.cmp(&Ranks::rank(r, n)?),
                        None => value::compare(ty, o, n)?,
                    };
                    let take_new = if *p == Partial::Min {
                        ord == Ordering::Greater
                    } else {
                        ord == Ordering::Less
                    };
                    changed |= take_new;
                    Some(if take_new { n } else { o })
                }
                Partial::ArrayAgg | Partial::JsonbAgg | Partial::StringAgg => {
                    let sep = a
                        .separators
                        .iter()
                        .find(|(c, _)| *c == i)
                        .map(|(_, s)| s.as_str());
                    owned.push((i, concat(*p, ty, sep, o, n)?));
                    changed = true;
                    None
                }
                Partial::BoolAnd | Partial::BoolOr => {
                    let t = if *p == Partial::BoolAnd {
                        o == b"t" && n == b"t"
                    } else {
                        o == b"t" || n == b"t"
                    };
                    let v: &[u8] = if t { b"t" } else { b"f" };
                    changed |= v != o;
                    Some(v)
                }
            },
        };
        vals.push(v);
    }
    if !changed {
        return Ok(None);
    }
    for (i, v) in &owned {
        vals[*i] = Some(v);
    }
    Ok(Some(Packed::pack(&vals)))
}

/// Two shards' partial `array_agg`, `jsonb_agg` or `string_agg` (text
/// format) as one: the elements of `a`, then those of `b` — an order
/// PostgreSQL could have fed them in (the aggregate has no ORDER BY).
fn concat(p: Partial, ty: Ty, sep: Option<&str>, a: &[u8], b: &[u8]) -> Result<Bytes, MergeError> {
    let refuse = |what: &str| MergeError(sqlstate::FEATURE_NOT_SUPPORTED, what.to_string());
    let mut out = Vec::with_capacity(a.len() + b.len() + 2);
    match p {
        Partial::ArrayAgg => {
            // `[0:1]={…}`: bounds other than 1; `{{…}}`: an array_agg of
            // arrays, whose shards' parts may differ in dimensions (where
            // PostgreSQL raises 2202E).
            let ok =
                |v: &[u8]| v.len() >= 3 && v[0] == b'{' && v[1] != b'{' && v[v.len() - 1] == b'}';
            if !ok(a) || !ok(b) {
                return Err(refuse(
                    "array_agg() of arrays cannot be combined across shards",
                ));
            }
            out.extend_from_slice(&a[..a.len() - 1]);
            // box[] is the one built-in array type delimited by ';'.
            out.push(if ty == Ty::Other(1020) { b';' } else { b',' });
            out.extend_from_slice(&b[1..]);
        }
        Partial::JsonbAgg => {
            let ok = |v: &[u8]| v.len() >= 2 && v[0] == b'[' && v[v.len() - 1] == b']';
            if !ok(a) || !ok(b) {
                return Err(MergeError(
                    sqlstate::INTERNAL_ERROR,
                    "a shard's jsonb_agg() is not a JSON array".into(),
                ));
            }
            out.extend_from_slice(&a[..a.len() - 1]);
            out.extend_from_slice(b", ");
            out.extend_from_slice(&b[1..]);
        }
        _ => {
            let sep = sep.ok_or_else(|| {
                MergeError(
                    sqlstate::INTERNAL_ERROR,
                    "string_agg() without its separator".into(),
                )
            })?;
            out.extend_from_slice(a);
            if ty == Ty::Bytea {
                // Hex output: `\x` and two digits a byte (the separator
                // literal has no backslash: its bytes are its text).
                let (Some(_), Some(rest)) = (a.strip_prefix(b"\\x"), b.strip_prefix(b"\\x")) else {
                    return Err(refuse(
                        "string_agg() of bytea across shards needs bytea_output = hex",
                    ));
                };
                for byte in sep.bytes() {
                    out.extend_from_slice(format!("{byte:02x}").as_bytes());
                }
                out.extend_from_slice(rest);
            } else {
                out.extend_from_slice(sep.as_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    Ok(Bytes::from(out))
}

pub(super) fn add(ty: Ty, a: &[u8], b: &[u8]) -> Result<Bytes, MergeError> {
    Ok(Bytes::from(match ty {
        Ty::Int => {
            let x: i128 = utf8(a)?
                .parse()
                .map_err(|_| MergeError(sqlstate::INTERNAL_ERROR, "bad integer".into()))?;
            let y: i128 = utf8(b)?
                .parse()
                .map_err(|_| MergeError(sqlstate::INTERNAL_ERROR, "bad integer".into()))?;
            (x + y).to_string()
        }
        Ty::Numeric => Num::parse(utf8(a)?)?.add(&Num::parse(utf8(b)?)?).to_text(),
        Ty::Float => float_text(parse_f64(utf8(a)?)? + parse_f64(utf8(b)?)?),
        other => {
            return Err(MergeError(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "cannot add values of type {} across shards (sum or avg of it is not merged by hotrepart)",
                    match other {
                        Ty::Other(oid) => value::type_name(oid),
                        t => format!("{t:?}"),
                    }
                ),
            ))
        }
    }))
}

/// The collation ranks of the text values a merge sorts by, per merged
/// column (`exec::text_order`): a ranked column's values compare by rank,
/// not by bytes. Empty: every column compares by its type.
#[derive(Default)]
pub(super) struct Ranks(Vec<Option<std::collections::HashMap<Vec<u8>, u64>>>);

impl Ranks {
    pub(super) fn set(&mut self, col: usize, ranks: std::collections::HashMap<Vec<u8>, u64>) {
        if self.0.len() <= col {
            self.0.resize_with(col + 1, || None);
        }
        self.0[col] = Some(ranks);
    }

    pub(super) fn of(&self, col: usize) -> Option<&std::collections::HashMap<Vec<u8>, u64>> {
        self.0.get(col)?.as_ref()
    }

    pub(super) fn rank(
        r: &std::collections::HashMap<Vec<u8>, u64>,
        v: &[u8],
    ) -> Result<u64, MergeError> {
        r.get(v).copied().ok_or_else(|| {
            MergeError(
                sqlstate::INTERNAL_ERROR,
                "a text value of the merge was not ranked by the shard".into(),
            )
        })
    }
}

/// Compares two shard rows by the plan's ORDER BY.
pub(super) fn compare_rows<A: Cols + ?Sized, B: Cols + ?Sized>(
    plan: &MergePlan,
    types: &[Ty],
    ranks: &Ranks,
    a: &A,
    b: &B,
) -> Result<Ordering, MergeError> {
    for k in &plan.order_by {
        let ty = key_ty(&k.value, types);
        let ranked = match &k.value {
            Combined::Col(c) => ranks.of(*c),
            _ => None,
        };
        let va = combined_value(&k.value, a, types)?;
        let vb = combined_value(&k.value, b, types)?;
        let o = match (va, vb) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => {
                if k.nulls_first {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            (Some(_), None) => {
                if k.nulls_first {
                    Ordering::Greater
                } else {
                    Ordering::Less
                }
            }
            (Some(x), Some(y)) => {
                let o = match ranked {
                    Some(r) => Ranks::rank(r, &x)?.cmp(&Ranks::rank(r, &y)?),
                    None => value::compare(ty, &x, &y)?,
                };
                if k.desc {
                    o.reverse()
                } else {
                    o
                }
            }
        };
        if o != Ordering::Equal {
            return Ok(o);
        }
    }
    Ok(Ordering::Equal)
}

/// The type OID of a combined value (`oids`: the shard columns'); None
/// when not a known one.
fn combined_oid(v: &Combined, oids: &[u32]) -> Option<u32> {
    match v {
        Combined::Col(c) => oids.get(*c).copied(),
        Combined::Avg { sum, .. } => match oids.get(*sum) {
            Some(700 | 701) => Some(701),
            Some(_) => Some(1700),
            None => None,
        },
        Combined::CountAs { to, .. } => Some(count_cast_type(*to).0),
    }
}

/// A string literal (or a parameter sent as text of no type: node-postgres
/// sends them so) compared with a number of type `oid`: PostgreSQL reads it
/// with that type's input function. Only plain decimals the node reads
/// exactly as PostgreSQL does are taken — integers within the integer
/// type's range (`int8in`, `int4in`, `int2in`: spaces around, a sign,
/// digits), `[sign] digits [. digits]` for numeric and float — as the
/// number to compare with; anything else stays refused.
pub(super) fn number_literal(s: &str, oid: u32) -> Option<String> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    let int = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let decimal = {
        let (a, b) = digits.split_once('.').unwrap_or((digits, ""));
        (!a.is_empty() || !b.is_empty())
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    };
    let fits = |lo: i128, hi: i128| t.parse::<i128>().is_ok_and(|v| (lo..=hi).contains(&v));
    let ok = match oid {
        20 => int && fits(i64::MIN.into(), i64::MAX.into()),
        23 => int && fits(i32::MIN.into(), i32::MAX.into()),
        21 => int && fits(i16::MIN.into(), i16::MAX.into()),
        // (Not float4: PostgreSQL reads it with float4's input function,
        // and compares a float4 aggregate with a number as float8.)
        1700 | 701 => decimal,
        _ => false,
    };
    ok.then(|| t.to_owned())
}

/// HAVING with SQL's three-valued logic (None = unknown). `oids`: the
/// shard columns' type OIDs.
pub(super) fn eval_having<R: Cols + ?Sized>(
    h: &HavingExpr,
    row: &R,
    types: &[Ty],
    oids: &[u32],
) -> Result<Option<bool>, MergeError> {
    Ok(match h {
        HavingExpr::And(a, b) => match (
            eval_having(a, row, types, oids)?,
            eval_having(b, row, types, oids)?,
        ) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        HavingExpr::Or(a, b) => match (
            eval_having(a, row, types, oids)?,
            eval_having(b, row, types, oids)?,
        ) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        HavingExpr::Not(a) => eval_having(a, row, types, oids)?.map(|v| !v),
        HavingExpr::IsNull { operand, negated } => {
            let null = operand_value(operand, row, types)?.0.is_none();
            Some(null != *negated)
        }
        HavingExpr::Compare { left, op, right } => {
            let (mut l, lt) = operand_value(left, row, types)?;
            let (mut r, rt) = operand_value(right, row, types)?;
            let ty = lt.or(rt).unwrap_or(Ty::Numeric);
            // A string compared with a number: read as that number's type
            // reads it, where the node can do so exactly.
            let oid = match (left, right) {
                (Operand::Value(c), _) | (_, Operand::Value(c)) => combined_oid(c, oids),
                _ => None,
            };
            // A real (float4) aggregate against a literal: PostgreSQL widens
            // it to double precision (0.1::real is not 0.1), which its text
            // does not show.
            let literal = |o: &Operand| {
                matches!(
                    o,
                    Operand::Literal(Literal::Number(_) | Literal::String(_) | Literal::Text(_))
                )
            };
            if oid == Some(700) && (literal(left) || literal(right)) {
                return Err(MergeError(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "HAVING compares a real (float4) aggregate with a number across shards: PostgreSQL compares it as double precision, which hotrepart cannot reproduce; cast the aggregate (max(r)::float8) or filter in WHERE".into(),
                ));
            }
            let mut unread = false;
            if ty != Ty::Text {
                for (o, v) in [(left, &mut l), (right, &mut r)] {
                    match o {
                        Operand::Literal(Literal::String(s)) => {
                            match oid.and_then(|oid| number_literal(s, oid)) {
                                Some(n) => *v = Some(Cow::Owned(n.into_bytes())),
                                None => unread = true,
                            }
                        }
                        Operand::Literal(Literal::Text(_)) => unread = true,
                        _ => {}
                    }
                }
            }
            if unread {
                return Err(MergeError(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("HAVING compares a {ty:?} value with a string literal across shards; hotrepart cannot apply PostgreSQL's input conversion for that type (session TimeZone, formats): compare with a number, or filter in WHERE"),
                ));
            }
            let (Some(l), Some(r)) = (l, r) else {
                return Ok(None);
            };
            let o = match ty {
                Ty::Int | Ty::Numeric => Num::parse(utf8(&l)?)?.cmp_num(&Num::parse(utf8(&r)?)?),
                other => value::compare(other, &l, &r)?,
            };
            Some(match op {
                CompareOp::Eq => o == Ordering::Equal,
                CompareOp::NotEq => o != Ordering::Equal,
                CompareOp::Lt => o == Ordering::Less,
                CompareOp::LtEq => o != Ordering::Greater,
                CompareOp::Gt => o == Ordering::Greater,
                CompareOp::GtEq => o != Ordering::Less,
            })
        }
    })
}

/// A value read or computed from a row: borrowed where it can be.
pub(super) type Value<'a> = Option<Cow<'a, [u8]>>;

/// An operand's value and, for column values, its type.
pub(super) fn operand_value<'a, R: Cols + ?Sized>(
    o: &'a Operand,
    row: &'a R,
    types: &[Ty],
) -> Result<(Value<'a>, Option<Ty>), MergeError> {
    Ok(match o {
        Operand::Value(c) => (combined_value(c, row, types)?, Some(key_ty(c, types))),
        Operand::Literal(Literal::Null) => (None, None),
        Operand::Literal(Literal::Bool(b)) => (
            Some(Cow::Borrowed(if *b { &b"t"[..] } else { &b"f"[..] })),
            None,
        ),
        Operand::Literal(Literal::Number(n)) => (Some(Cow::Borrowed(n.as_bytes())), None),
        Operand::Literal(Literal::String(sv) | Literal::Text(sv)) => {
            (Some(Cow::Borrowed(sv.as_bytes())), None)
        }
        Operand::Param(_) => {
            return Err(MergeError(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "parameters in HAVING are not supported yet".into(),
            ))
        }
    })
}
