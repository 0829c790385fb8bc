//! Small helpers over parsed expressions shared by the planners, and the
//! refusal they all return for what the router cannot route.

use sqlparser::ast::{BinaryOperator, Expr};

use super::super::RouteError;

/// The `0A000` refusal: a statement the router cannot route correctly.
pub(super) fn unsupported(msg: impl Into<String>) -> RouteError {
    RouteError::unsupported(msg)
}

/// Splits `e` into its top-level AND conjuncts.
pub(super) fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

/// `e` without enclosing parentheses.
pub(super) fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}
