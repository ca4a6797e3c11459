//! Analysis: from a history of memory samples to a verdict (leak suspected or not),
//! a growth rate and a time to exhaustion.

pub mod history;
pub mod trend;
pub mod uncertainty;
