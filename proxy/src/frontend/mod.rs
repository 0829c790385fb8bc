//! The client side of a node: the listener, TLS, the startup handshake
//! (SSLRequest, GSSENCRequest, CancelRequest, startup parameters), limits
//! and authentication; a client that logs in is handed to a
//! [`crate::session::Session`].

pub mod auth;
pub mod cbind;
pub mod listener;
