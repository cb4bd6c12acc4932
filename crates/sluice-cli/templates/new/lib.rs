//! {{name}}: a sluice function. It answers every request with a greeting that names the request's
//! method and path, and writes one log line per call (`sluice logs {{name}}` shows them).

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Function);

struct Function;

impl wasip2::exports::http::incoming_handler::Guest for Function {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Other(name) => name,
        };
        let path = request.path_with_query().unwrap_or_else(|| "/".to_string());
        // Guest stdout and stderr become the invocation's log lines.
        println!("{method} {path}");

        let body_text = format!("hello from {{name}}: {method} {path}\n");
        let headers = Fields::from_list(&[
            ("content-type".to_string(), b"text/plain".to_vec()),
            ("content-length".to_string(), body_text.len().to_string().into_bytes()),
        ])
        .unwrap();
        let response = OutgoingResponse::new(headers);
        let body = response.body().unwrap();
        ResponseOutparam::set(response_out, Ok(response));
        {
            let out = body.write().unwrap();
            out.blocking_write_and_flush(body_text.as_bytes()).unwrap();
        }
        OutgoingBody::finish(body, None).unwrap();
    }
}
