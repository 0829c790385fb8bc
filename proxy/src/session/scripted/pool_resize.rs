//! A pool resized by a reload (`Pool::apply`) under checked-out
//! connections, over the fake PostgreSQL: it grows at once, shrinks as
//! connections come back (each closed rather than pooled while the shrink
//! is owed), and never has more than its size out afterwards.

use super::*;
use std::time::Duration;

#[tokio::test]
async fn a_pool_shrinks_as_connections_come_back_and_grows_at_once() {
    let (node, pg) = node(1, "pool_size = 3").await;
    let p = pool(&node, 0);
    let fp = crate::backend::state::SessionState::default().fingerprint();
    let wait = Duration::from_secs(5);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(p.get(fp, wait).await.expect("a connection"));
    }
    assert_eq!((p.size(), p.busy_count()), (3, 3));
    let settings = |size| crate::backend::pool::PoolSettings {
        size,
        connect_timeout: wait,
        lifetime: None,
        idle_timeout: None,
    };
    p.apply(&settings(1));
    // The three stay with their clients.
    assert_eq!((p.size(), p.busy_count()), (1, 3));
    let mut releases = held.drain(..);
    for busy in [2, 1] {
        releases.next().expect("held").release();
        assert_eq!(p.busy_count(), busy);
        assert_eq!(p.idle_count(), 0, "closed, not pooled, while shrinking");
    }
    releases.next().expect("held").release();
    drop(releases);
    assert_eq!((p.busy_count(), p.idle_count()), (0, 1));
    eventually("two of the fake's connections closed", || pg[0].open() == 1).await;
    // One at a time now.
    let one = p.get(fp, wait).await.expect("the one connection");
    let e = p.get(fp, Duration::from_millis(20)).await.err();
    assert!(
        matches!(
            e,
            Some(crate::backend::pool::PoolError::Timeout { size: 1, .. })
        ),
        "{e:?}"
    );
    // Growing lets a second client in at once.
    p.apply(&settings(2));
    let two = p
        .get(fp, Duration::from_millis(500))
        .await
        .expect("a second one");
    assert_eq!(p.busy_count(), 2);
    one.release();
    two.release();
    assert_eq!((p.busy_count(), p.idle_count()), (0, 2));
}
