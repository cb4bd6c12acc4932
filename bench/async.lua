-- wrk script: queue async calls (the 202 path).
wrk.method = "POST"
wrk.headers["Prefer"] = "respond-async"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SLUICE_TOKEN")
wrk.body = "x"
