//! The HTTP API: one poem-openapi struct per area, composed in `startup`.

pub mod health;
pub mod sync;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum ApiTags {
    /// Pushing and pulling changes.
    Sync,
    /// Liveness and status.
    Health,
}
