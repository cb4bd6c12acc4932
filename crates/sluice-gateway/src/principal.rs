//! Who is calling: the principal a key stands for, and the bearer token it came in.

use sluice_core::Scope;

/// Who is calling: the key's tenant (none for admin keys), scopes and, for a key limited to one
/// alias, that alias.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub tenant: Option<String>,
    pub scopes: Vec<Scope>,
    /// The only alias this key may call; `None`: any alias or version.
    pub alias: Option<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether the key may see `tenant`'s objects at all. Objects of other tenants answer 404.
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant.as_deref() == Some(tenant)
    }

    /// Whether the key may act on `tenant` with `scope`.
    pub fn may(&self, tenant: &str, scope: Scope) -> bool {
        self.is_admin() || (self.tenant.as_deref() == Some(tenant) && self.scopes.contains(&scope))
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
