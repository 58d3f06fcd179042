//! The node's broker subscriptions follow local membership: a channel is subscribed while the
//! hub has a local connection on it. Membership changes at once in the hub, but the broker call
//! that follows takes a round trip to a networked broker; a last connection leaving and a first
//! one joining the same channel could then reach the broker in the wrong order and leave a
//! member without a subscription. So calls for one channel take turns (a lock per stripe of
//! channels) and each decides from the hub's membership at its turn, not from the change that
//! started it.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::delivery::Channel;
use crate::engine::EngineError;
use crate::engine::broker::Broker;

/// Locks shared by all channels: enough that unrelated channels rarely wait for each other.
const STRIPES: usize = 256;

pub struct Subscriptions {
    broker: Arc<dyn Broker>,
    stripes: Box<[Mutex<()>]>,
    hasher: RandomState,
}

impl Subscriptions {
    pub fn new(broker: Arc<dyn Broker>) -> Subscriptions {
        Subscriptions {
            broker,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Subscribes `channel` if `wanted()` holds at this call's turn, unsubscribes it if not.
    /// Called after each first join and last leave of the channel in the hub.
    pub async fn follow(
        &self,
        channel: &Channel,
        wanted: impl Fn() -> bool,
    ) -> Result<(), EngineError> {
        let stripe = self.hasher.hash_one(channel) as usize % STRIPES;
        let _turn = self.stripes[stripe].lock().await;
        if wanted() {
            self.broker.subscribe(channel).await
        } else {
            self.broker.unsubscribe(channel).await
        }
    }
}
