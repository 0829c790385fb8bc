//! Test-only fault injection: a switch that cuts one node off from its
//! peers ([`CatalogHandle::set_partitioned`](super::CatalogHandle::set_partitioned)).
//!
//! The handle holds the [`PartitionSwitch`]; the driver and the transport
//! ([`crate::net`]) each watch a receiver of it. While it is on, the
//! transport closes its connections and refuses new ones, and the driver
//! forgets its links and ignores links that come up; turning it off lets
//! the transport dial again. Nothing else in the node changes: the replica
//! sees exactly what a real partition would show it.

use tokio::sync::watch;

/// The sending side of the partition flag.
pub(super) struct PartitionSwitch(watch::Sender<bool>);

impl PartitionSwitch {
    /// A switch that is off, and the receiver the driver and the
    /// transport watch.
    pub(super) fn new() -> (PartitionSwitch, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (PartitionSwitch(tx), rx)
    }

    /// Turns the partition on or off.
    pub(super) fn set(&self, on: bool) {
        self.0.send_replace(on);
    }
}
