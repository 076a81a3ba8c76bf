// A plain Node http server under `handoff run`: it takes the listening
// socket at fd 3 and, having no Unix datagram sockets for sd_notify, says
// READY=1 through `handoff notify` (a process of its own process group).
// On SIGTERM it stops accepting, lets requests finish and exits.
const http = require("http");
const { execFileSync } = require("child_process");

let stopping = false;
const server = http.createServer((req, res) => {
  if (stopping) res.setHeader("Connection", "close");
  res.end(`pid=${process.pid}\n`);
});
server.listen({ fd: 3 }, () => {
  execFileSync(process.env.HANDOFF_BIN, ["notify", "READY=1"], { stdio: "inherit" });
});
process.on("SIGTERM", () => {
  stopping = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
