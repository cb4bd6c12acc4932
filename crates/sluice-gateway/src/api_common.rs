//! What every `/v1` route shares, and nothing else: the error type, the authenticated caller and
//! its access checks, JSON bodies, and the types two route modules both return. A leaf: it imports
//! none of the `api*` route modules, so they depend on it and never on each other.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::IntoResponse;
use http::request::Parts;
use serde::{Deserialize, Serialize};
use sluice_core::{ErrorKind, LogStream, Scope, SluiceError, rfc3339};
use sluice_store::LogLine;
use utoipa::ToSchema;

// The error schema is defined beside the document; handlers name it in their annotations.
pub(crate) use crate::api_openapi::ErrorBody;
use crate::error::{error_response, store_error};
use crate::node::{Node, Principal, bearer};

/// An API error: rendered by the one error function.
pub struct ApiError(SluiceError);

impl From<SluiceError> for ApiError {
    fn from(e: SluiceError) -> Self {
        Self(e)
    }
}

impl From<sluice_store::StoreError> for ApiError {
    fn from(e: sluice_store::StoreError) -> Self {
        Self(store_error(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        error_response(&self.0, None).map(axum::body::Body::new)
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller of an API route.
pub struct Auth(pub Arc<Principal>);

impl FromRequestParts<Arc<Node>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, Self::Rejection> {
        // The front door found the key's principal already, for the control plane's bounds.
        if let Some(Admitted(principal)) = parts.extensions.get::<Admitted>() {
            return Ok(Auth(principal.clone()));
        }
        let key = bearer(&parts.headers).ok_or_else(|| {
            SluiceError::new(ErrorKind::Unauthorized, "missing API key: send Authorization: Bearer <key>")
        })?;
        let principal = node
            .principal_for_key(key)
            .ok_or_else(|| SluiceError::new(ErrorKind::Unauthorized, "invalid or revoked API key"))?;
        Ok(Auth(principal))
    }
}

/// The principal of a request's key, looked up once by the front door (`server::route`) and
/// carried to the API in the request's extensions.
#[derive(Clone)]
pub(crate) struct Admitted(pub Arc<Principal>);

impl Auth {
    /// Checks access to a tenant's objects: unseen tenants are 404, a missing scope is 403.
    pub(crate) fn require(&self, tenant: &str, scope: Scope) -> Result<(), SluiceError> {
        if !self.0.sees(tenant) {
            return Err(no_tenant(tenant));
        }
        if !self.0.may(tenant, scope) {
            return Err(SluiceError::new(
                ErrorKind::Forbidden,
                format!("this key lacks the {} scope for tenant {tenant}", scope.as_str()),
            ));
        }
        Ok(())
    }

    /// Checks an admin-only action on a tenant's objects: a tenant key sees its own tenant but may
    /// not manage it (403); other tenants stay invisible (404).
    pub(crate) fn require_admin(&self, tenant: &str, action: &str) -> Result<(), SluiceError> {
        if !self.0.sees(tenant) {
            return Err(no_tenant(tenant));
        }
        if !self.0.is_admin() {
            return Err(admin_only(action));
        }
        Ok(())
    }
}

pub(crate) fn no_tenant(tenant: &str) -> SluiceError {
    SluiceError::not_found(format!("no tenant {tenant}"))
}

pub(crate) fn admin_only(action: &str) -> SluiceError {
    SluiceError::new(ErrorKind::Forbidden, format!("only an admin key may {action}"))
}

pub(crate) async fn require_tenant(node: &Node, tenant: &str) -> Result<(), ApiError> {
    if node.store.get_tenant(tenant).await?.is_none() {
        return Err(no_tenant(tenant).into());
    }
    Ok(())
}

/// Parses a JSON request body into `T`, naming what was expected when it does not fit.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, SluiceError> {
    serde_json::from_slice(body).map_err(|e| SluiceError::bad_request(format!("invalid {what}: {e}")))
}

/// A guest log line.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LogLineInfo {
    /// Orders the lines of one function across invocations: the cursor of `after`.
    pub seq: i64,
    pub invocation_id: String,
    #[schema(schema_with = crate::api_openapi::log_stream_schema)]
    pub stream: LogStream,
    pub line: String,
    #[schema(format = DateTime)]
    pub at: String,
}

impl LogLineInfo {
    pub(crate) fn of(l: &LogLine) -> Self {
        Self {
            seq: l.seq,
            invocation_id: l.invocation_id.clone(),
            stream: l.stream,
            line: l.line.clone(),
            at: rfc3339(l.at),
        }
    }
}
