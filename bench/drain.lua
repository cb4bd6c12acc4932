-- wrk script: queue async calls that may not start for an hour, and stop after BACKLOG_PER_THREAD
-- answers (bench/drain.sh builds the backlog with it).
local limit = tonumber(os.getenv("BACKLOG_PER_THREAD"))
local answered = 0
wrk.method = "POST"
wrk.headers["Prefer"] = "respond-async"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SLUICE_TOKEN")
wrk.headers["sluice-start-after"] = os.getenv("START_AFTER")
wrk.body = "x"

function response(status, headers, body)
  answered = answered + 1
  if answered >= limit then
    wrk.thread:stop()
  end
end
