//! KEDA's external scaler protocol (`externalscaler.ExternalScaler`) over pods' connection
//! census: a ScaledObject's metadata selects pods (namespace + label selector), a metric and a
//! target; the answer is the metric summed over those pods.
//!
//! `query` parses and evaluates (pure, shared by the node agent and the aggregator; label
//! selectors through `crate::selector`), `service` is the gRPC service over a `PodSource`,
//! `coverage` decides which part of the aggregator's fleet a value may stand on.
//! Never reads the host itself: the census comes from the metrics snapshot or the aggregator.

pub mod coverage;
pub mod query;
pub mod service;

pub use query::{Evaluation, Metric, Query, QueryError, evaluate};
pub use service::{Census, PodSource, ScalerService, SnapshotSource};
