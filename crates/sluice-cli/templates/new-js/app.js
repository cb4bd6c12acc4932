// {{name}}: a sluice function in JavaScript. It answers every request with a greeting that names
// the request's method and path, and writes one log line per call (`sluice logs {{name}}` shows
// them).
//
// componentize-js runs this module in StarlingMonkey, which turns each wasi:http/incoming-handler
// call into a service-worker `fetch` event. No sluice SDK.

addEventListener("fetch", (event) => event.respondWith(handle(event.request)));

async function handle(request) {
  const url = new URL(request.url);
  const path = url.pathname + url.search;
  // Guest stdout and stderr become the invocation's log lines.
  console.log(`${request.method} ${path}`);
  // Environment variables set with `sluice deploy --env K=V`: getEnvironment() from
  // "wasi:cli/environment@0.2.10" (the world imports it), called at request time.
  return new Response(`hello from {{name}}: ${request.method} ${path}\n`, {
    headers: { "content-type": "text/plain" },
  });
}
