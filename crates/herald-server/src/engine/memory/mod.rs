//! Embedded single-process engines: the default, needing no external service.

mod broker;
mod presence;

pub use broker::MemoryBroker;
pub use presence::MemoryPresence;
