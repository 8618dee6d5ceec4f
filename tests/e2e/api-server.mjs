// A real Zero API server built on @rocicorp/zero/server: custom mutators run in upstream
// Postgres through the postgres.js adapter that @rocicorp/zero ships.
//   node api-server.mjs <postgres URI>
// Prints {"port": N} once listening, then one JSON line per request
// ({"path", "search", "headers", "body"}). POST /control {"mode": "ok"|"500"|"garbage"|"slow"}
// changes how /mutate answers.
// With API_WORKERS=N (N > 1) it runs N processes sharing the port (node:cluster), as a
// production API server would use its cores; /control then reaches one process only.
import cluster from 'node:cluster';
import http from 'node:http';
import postgres from 'postgres';
import {handleMutateRequest, getMutation} from '@rocicorp/zero/server';
import {zeroPostgresJS} from '@rocicorp/zero/server/adapters/postgresjs';
import {schema, mutators} from './app.mjs';

const workers = Number(process.env.API_WORKERS ?? 1);
if (workers > 1 && cluster.isPrimary) {
  let announced = false;
  for (let i = 0; i < workers; i++) {
    cluster.fork().on('message', m => {
      if (!announced && m?.port) {
        announced = true;
        process.stdout.write(JSON.stringify({port: m.port}) + '\n');
      }
    });
  }
  process.stdin.on('end', () => {
    for (const w of Object.values(cluster.workers)) w.kill();
    process.exit(0);
  });
  process.stdin.resume();
} else {
  serve();
}

function serve() {
  const sql = postgres(process.argv[2], {max: 10, onnotice: () => {}});
  const db = zeroPostgresJS(schema, sql);
  let mode = 'ok';

  const readBody = req =>
    new Promise((resolve, reject) => {
      const chunks = [];
      req.on('data', c => chunks.push(c));
      req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      req.on('error', reject);
    });

  const server = http.createServer(async (req, res) => {
    try {
      const url = new URL(req.url, 'http://localhost');
      const text = await readBody(req);
      const body = text ? JSON.parse(text) : null;
      if (url.pathname === '/control') {
        mode = body.mode;
        res.end('{}');
        return;
      }
      process.stdout.write(
        JSON.stringify({path: url.pathname, search: url.search, headers: req.headers, body}) + '\n',
      );
      if (!url.pathname.endsWith('/mutate')) {
        res.statusCode = 404;
        res.end('not found');
        return;
      }
      if (mode === '500') {
        res.statusCode = 500;
        res.end('database is down');
        return;
      }
      if (mode === 'drop') {
        req.socket.destroy();
        return;
      }
      if (mode === 'garbage') {
        res.setHeader('content-type', 'application/json');
        res.end('<html>not json');
        return;
      }
      if (mode === 'slow') {
        await new Promise(r => setTimeout(r, 1500));
      }
      // The user this API server authenticated (here: named by a forwarded header) is echoed in
      // the response's userID, which zero-cache checks against the connection's. Without the
      // header the response names no user.
      const userID = req.headers['x-user-id'];
      const handler = (transact, _mutation) =>
        transact((tx, name, args) => getMutation(mutators, name)(tx, args, {userID}));
      const result =
        userID === undefined
          ? await handleMutateRequest(db, handler, url.searchParams, body, 'error')
          : await handleMutateRequest({
              dbProvider: db,
              handler,
              userID,
              query: url.searchParams,
              body,
              logLevel: 'error',
            });
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(result));
    } catch (e) {
      res.statusCode = 500;
      res.end(String(e?.stack ?? e));
    }
  });
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1', () => {
    const port = server.address().port;
    if (cluster.isWorker) {
      process.send({port});
    } else {
      process.stdout.write(JSON.stringify({port}) + '\n');
    }
  });
  if (cluster.isWorker) {
    process.on('disconnect', () => process.exit(0));
  } else {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.resume();
  }
}
