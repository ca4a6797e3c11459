//! Export: what the daemon knows, for Prometheus (`/metrics`) and people (JSON API).
//!
//! In: [`crate::model::SeriesView`]s built each sampling tick and the probes' counters. Out: the
//! exposition text and the JSON documents, rendered once per tick so a scrape only
//! copies a string.

pub mod http;
pub mod metrics;
pub mod web_config;
