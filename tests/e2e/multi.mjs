// Many @rocicorp/zero clients (each its own client group) in one process writing at once.
//   node multi.mjs <server URL> <clients> <mutations per client> <in flight per client> <prefix> [all|none]
// ("none": no client materializes a query; confirmations still arrive with each poke)
// Output lines: {"ready": clients} when every view is complete; {"done": n, "ms", "times": [...]}
// when every mutation is server-confirmed (times: client call → confirmation, ms; start/end:
// wall clock of the first call and the last confirmation, epoch ms); then
// {"views": [...]} once every client's view has all rows: each view as [id, title, n] rows.
import {Zero} from '@rocicorp/zero';
import {schema, mutators} from './app.mjs';

const [server, clientsText, perText, inflightText, prefix, viewMode] = process.argv.slice(2);
const withViews = viewMode !== 'none';
const clients = Number(clientsText);
const per = Number(perText);
const inflight = Number(inflightText);
const out = v => process.stdout.write(JSON.stringify(v) + '\n');

const zs = [];
const views = [];
const latest = [];
const complete = [];
for (let c = 0; c < clients; c++) {
  const z = new Zero({server, schema, mutators, userID: 'anon', kvStore: 'mem', logLevel: 'error'});
  latest.push([]);
  complete.push(!withViews);
  zs.push(z);
  if (withViews) {
    const v = z.query.item.orderBy('id', 'asc').materialize();
    v.addListener((data, type) => {
      latest[c] = data;
      if (type === 'complete') complete[c] = true;
    });
    views.push(v);
  }
}
const waitFor = async (pred, ms) => {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) return false;
    await new Promise(r => setTimeout(r, 10));
  }
  return true;
};
await waitFor(() => complete.every(Boolean), 60_000);
// Without views, wait until every client is connected.
if (!withViews) {
  await waitFor(() => zs.every(z => z.connection?.state?.current?.name === 'connected' || z.connection?.state?.current === 'connected'), 5_000);
}
const before = latest[0].length;
out({ready: clients});
// MULTI_START_AT (epoch ms) lines up several processes' first calls.
const startAt = Number(process.env.MULTI_START_AT ?? 0);
if (startAt > Date.now()) await new Promise(r => setTimeout(r, startAt - Date.now()));

const times = [];
const t0 = performance.now();
await Promise.all(
  zs.map(async (z, c) => {
    let next = 0;
    const worker = async () => {
      while (next < per) {
        const i = next++;
        const s = performance.now();
        const r = await z.mutate(mutators.item.create({id: `${prefix}-${c}-${i}`, title: `t${c}`, n: i})).server;
        if (r.type !== 'success') out({error: r});
        times.push(performance.now() - s);
      }
    };
    await Promise.all(Array.from({length: inflight}, worker));
  }),
);
const t1 = performance.now();
out({done: times.length, ms: t1 - t0, start: performance.timeOrigin + t0, end: performance.timeOrigin + t1, times});
if (withViews) {
  const total = before + clients * per;
  await waitFor(() => latest.every(l => l.length >= total), 60_000);
  out({views: latest.map(l => l.map(r => [r.id, r.title, r.n]))});
}
await Promise.all(views.map(v => v.destroy()));
await Promise.all(zs.map(z => z.close()));
process.exit(0);
