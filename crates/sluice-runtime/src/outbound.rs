//! The outbound HTTP policy: a guest reaches only the hosts in its version's allowlist, and never
//! loopback, private, link-local or metadata addresses unless the operator allowed them.
//!
//! A denied request fails inside the guest with the wasi:http error `HTTP-request-denied`, never
//! touches the network, and leaves a `system` line in the invocation's log.

use std::net::IpAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use sluice_core::FunctionConfig;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::logs::LogCapture;

/// Per-invocation outbound policy; implements wasmtime-wasi-http's hooks.
pub struct OutboundPolicy {
    pub(crate) config: Arc<FunctionConfig>,
    pub(crate) allow_private: bool,
    pub(crate) logs: LogCapture,
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri().clone();
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_string();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let logs = self.logs.clone();
        if !self.config.outbound_allowed(&host, Some(port)) {
            logs.system(format!(
                "outbound request to {host}:{port} denied: host is not in this function's allow list"
            ));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let allow_private = self.allow_private;
        Box::new(async move {
            if !allow_private {
                let addrs = tokio::net::lookup_host((host.as_str(), port)).await.map_err(|_| {
                    HttpError::DnsError { rcode: Some("lookup failed".into()), info_code: None }
                })?;
                for addr in addrs {
                    if is_private(addr.ip()) {
                        logs.system(format!(
                            "outbound request to {host}:{port} denied: {} is a private address",
                            addr.ip()
                        ));
                        return Err(HttpError::DestinationIpProhibited);
                    }
                }
            }
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

/// Loopback, private (RFC 1918, ULA), link-local (which includes cloud metadata at
/// 169.254.169.254), CGNAT, unspecified and multicast addresses.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
