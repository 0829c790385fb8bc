//! Shard-key sources in statements: literals, parameters, arrays, and
//! the AND/OR structure over them, with the rules that decide when an
//! expression is a key value at all (plain literal or `$n`, optionally cast
//! to a compatible type). Anything else is not a key value, which can only
//! widen a route.

use sqlparser::ast::{self, Expr, UnaryOperator, Value};

use super::key_type_of;
use super::RouteError;
use crate::catalog::{KeyType, KeyValue, ShardedTable};

/// Where a key value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Src {
    /// A literal, parsed at plan time.
    Lit(KeyValue),
    /// A literal NULL (matches nothing).
    Null,
    /// Parameter `$n` (0-based index here).
    Param(usize),
    /// Parameter `$n` holding an array of keys (`= ANY($n)`).
    ParamArray(usize),
}

/// A key source with the type its value has (the column's type, or the type
/// of an explicit cast; integer types hash alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypedSrc {
    pub src: Src,
    pub ty: KeyType,
}

/// A set of keys, built from the WHERE / ON structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyExpr {
    /// The key is one of these.
    Keys(Vec<TypedSrc>),
    /// Both hold: intersection.
    And(Box<KeyExpr>, Box<KeyExpr>),
    /// Either holds: union.
    Or(Box<KeyExpr>, Box<KeyExpr>),
}

/// Why an expression is not a key source.
pub(crate) enum SrcError {
    /// Not a literal/parameter (or an incompatible cast).
    NotValue,
    /// A literal of the wrong form for the key type.
    Parse(RouteError),
}

/// The key value of `e` if it is a literal or parameter (possibly cast to a
/// compatible type) for a column of type `ty`.
pub(crate) fn value_src(e: &Expr, ty: KeyType) -> Result<TypedSrc, SrcError> {
    let lit = |text: &str, ty: KeyType| {
        KeyValue::parse(ty, text)
            .map(|v| TypedSrc {
                src: Src::Lit(v),
                ty,
            })
            .map_err(|e| {
                SrcError::Parse(RouteError {
                    sqlstate: e.sqlstate(),
                    message: e.to_string(),
                })
            })
    };
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) if ty.is_integer() => lit(n, ty),
            Value::SingleQuotedString(s) => lit(s, ty),
            // The tokenizer reads E'…' escapes as PostgreSQL does, or fails
            // (refused) where it cannot (bytes above 127, surrogates).
            Value::EscapedStringLiteral(s) => lit(s, ty),
            Value::DollarQuotedString(s) => lit(&s.value, ty),
            Value::Null => Ok(TypedSrc { src: Src::Null, ty }),
            Value::Placeholder(p) => placeholder(p)
                .map(|i| TypedSrc {
                    src: Src::Param(i),
                    ty,
                })
                .ok_or(SrcError::NotValue),
            _ => Err(SrcError::NotValue),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } if ty.is_integer() => match strip(expr) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => lit(&format!("-{n}"), ty),
                _ => Err(SrcError::NotValue),
            },
            _ => Err(SrcError::NotValue),
        },
        Expr::Cast {
            expr, data_type, ..
        } => {
            let cast = key_type_of(&type_name(data_type)).ok_or(SrcError::NotValue)?;
            if !compatible(cast, ty) {
                return Err(SrcError::NotValue);
            }
            value_src(expr, cast)
        }
        Expr::TypedString(ts) => {
            let cast = key_type_of(&type_name(&ts.data_type)).ok_or(SrcError::NotValue)?;
            if !compatible(cast, ty) {
                return Err(SrcError::NotValue);
            }
            match &ts.value.value {
                Value::SingleQuotedString(s) => lit(s, cast),
                _ => Err(SrcError::NotValue),
            }
        }
        _ => Err(SrcError::NotValue),
    }
}

/// The source of an array of keys for `= ANY(e)`.
pub(crate) fn array_src(e: &Expr, ty: KeyType) -> Option<Vec<TypedSrc>> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => placeholder(p).map(|i| {
                vec![TypedSrc {
                    src: Src::ParamArray(i),
                    ty,
                }]
            }),
            Value::SingleQuotedString(s) => {
                let elems = super::params::parse_text_array(s).ok()?;
                elems
                    .into_iter()
                    .map(|el| match el {
                        None => Some(TypedSrc { src: Src::Null, ty }),
                        Some(text) => KeyValue::parse(ty, &text).ok().map(|v| TypedSrc {
                            src: Src::Lit(v),
                            ty,
                        }),
                    })
                    .collect()
            }
            _ => None,
        },
        Expr::Array(arr) => arr.elem.iter().map(|el| value_src(el, ty).ok()).collect(),
        Expr::Cast {
            expr, data_type, ..
        } => {
            let name = type_name(data_type);
            let elem = name.strip_suffix("[]")?;
            let cast = key_type_of(elem)?;
            if !compatible(cast, ty) {
                return None;
            }
            array_src(expr, cast)
        }
        _ => None,
    }
}

pub(crate) fn type_name(dt: &ast::DataType) -> String {
    let s = dt.to_string().to_ascii_lowercase();
    // `varchar(10)` → `varchar`, `int8[]` stays.
    match (s.find('('), s.find(')')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}{}", &s[..open], &s[close + 1..])
        }
        _ => s,
    }
}

/// Whether a value of type `a` can stand for a key of type `b`.
pub(crate) fn compatible(a: KeyType, b: KeyType) -> bool {
    a == b || (a.is_integer() && b.is_integer())
}

/// `$3` → `Some(2)`.
pub(crate) fn placeholder(p: &str) -> Option<usize> {
    p.strip_prefix('$')?
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(1))
}

/// Whether two sharded tables are co-located (equal keys, same shard).
pub(crate) fn colocated(a: &ShardedTable, b: &ShardedTable) -> bool {
    a.function.colocated(a.key_type, &b.function, b.key_type)
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}
