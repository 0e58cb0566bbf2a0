//! The data path after capture: accept, identify, authorize, tunnel, deliver.

pub mod socket;
