//! Empty on purpose: this library target exists so that `leakmon` can name this crate as
//! a build-dependency, which makes cargo rebuild `leakmon` when the programs change.
#![no_std]
