//! Minimal `wasi:http/proxy` guest used for throughput benchmarks.
//! Responds `200 text/plain "hello from sluice\n"` to every request.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hello);

struct Hello;

const BODY: &[u8] = b"hello from sluice\n";

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::from_list(&[
            ("content-type".to_string(), b"text/plain".to_vec()),
            ("content-length".to_string(), BODY.len().to_string().into_bytes()),
        ])
        .unwrap();
        let resp = OutgoingResponse::new(headers);
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        {
            let out = body.write().unwrap();
            out.blocking_write_and_flush(BODY).unwrap();
        }
        OutgoingBody::finish(body, None).unwrap();
    }
}
