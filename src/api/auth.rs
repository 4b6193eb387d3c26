//! The bearer extractor of the authenticated operations.

use poem::Request;
use poem_openapi::{SecurityScheme, auth::Bearer};

use crate::api::error::Answer;
use crate::auth::User;
use crate::state::AppState;

/// `Authorization: Bearer <JWT>` signed by a key of the auth service's JWKS.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub User);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<User> {
    // A request with a body had its token checked before the body was read.
    let user = match req.extensions().get::<User>() {
        Some(user) => user.clone(),
        None => {
            let state = req.data::<AppState>().expect("AppState is attached to every route");
            state.verify(&bearer.token).await.map_err(|e| Answer::from(&e))?
        }
    };
    tracing::Span::current().record("user_id", user.id.as_str());
    Ok(user)
}
