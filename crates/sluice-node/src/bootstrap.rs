//! The first run of a node on an empty store: the default tenant and an admin key, kept in the
//! data directory's token file, which every start makes owner-only again.

use std::path::Path;
use std::sync::Arc;

use sluice_core::Scope;
use sluice_gateway::DEFAULT_TENANT;
use sluice_store::{KeyRecord, Store};

/// File in the data directory holding the first admin key.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Prepares an empty store: creates tenant `default` and, when there are no keys at all, an admin
/// key, written to `<data-dir>/admin.token` with mode 0600. Returns the new key so the caller can
/// print it once. On every start the token file is made 0600 again if it was left readable by
/// others (a copy, a restored backup, a careless chmod), with a warning.
pub async fn bootstrap(store: &Arc<dyn Store>, data_dir: &Path) -> anyhow::Result<Option<String>> {
    if store.get_tenant(DEFAULT_TENANT).await?.is_none() && store.list_tenants().await?.is_empty() {
        // Nodes of a cluster starting together on an empty database race to create it.
        match store.create_tenant(DEFAULT_TENANT).await {
            Ok(_) | Err(sluice_store::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let key = if store.list_keys(None).await?.is_empty() {
        Some(first_admin_key(store, &path).await?)
    } else {
        None
    };
    if let Some(mode) = seal_token_file(&path)? {
        tracing::warn!(
            "{} was readable by others (mode {mode:04o}); it holds an admin key, so its mode is now 0600",
            path.display()
        );
    }
    Ok(key)
}

async fn first_admin_key(store: &Arc<dyn Store>, path: &Path) -> anyhow::Result<String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness for the admin key: {e}"))?;
    let key = sluice_core::ids::api_key_from_secret(&secret);
    let record = KeyRecord {
        id: sluice_core::ids::short_id("key"),
        tenant: None,
        scopes: vec![Scope::Admin],
        hash: sluice_core::ids::hash_api_key(&key),
        created_at: sluice_core::Clock::now_ms(&sluice_core::SystemClock),
        revoked: false,
        alias: None,
    };
    write_secret(path, &key)?;
    store.create_key(&record).await?;
    Ok(key)
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    writeln!(f, "{secret}")
}

/// Takes group and other permissions off a secret file (`mode` only applies when a file is
/// created, so a file that already existed keeps whatever it had). Returns the mode it had when
/// that was broader than owner-only; a missing file is not an error (the key may live elsewhere).
fn seal_token_file(path: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Some(mode))
}
