//! placeholder until harness lands
