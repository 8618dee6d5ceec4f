// The unmodified @rocicorp/zero client's inspector (`z.inspector`) against a zero-cache: waits
// for its view of open issues, then prints one JSON line per inspector call:
//   {"step": "...", ...}
// Usage: node inspect.mjs <server URL> <admin password>
import {Zero} from '@rocicorp/zero';
import {materializeOpenIssues, schema} from './issues.mjs';

const [server, password] = process.argv.slice(2);
if (!server || password === undefined) {
  console.error('usage: node inspect.mjs <server URL> <admin password>');
  process.exit(2);
}

const out = (step, fields) =>
  process.stdout.write(JSON.stringify({step, ...fields}) + '\n');

const z = new Zero({server, schema, kvStore: 'mem', logLevel: 'error'});
const view = materializeOpenIssues(z);
await new Promise(resolve =>
  view.addListener((data, type) => {
    if (type === 'complete') resolve();
  }),
);
out('hydrated', {});

// Without a password the client would prompt for one; Node has no prompt.
try {
  await z.inspector.serverVersion();
  out('before-auth', {ok: true});
} catch (e) {
  out('before-auth', {error: String(e?.message ?? e)});
}
out('auth-wrong', {value: await z.inspector.authenticate('wrong')});
out('auth', {value: await z.inspector.authenticate(password)});
out('version', {value: await z.inspector.serverVersion()});

const queries = await z.inspector.client.queries();
out('queries', {
  value: queries.map(q => ({
    id: q.id,
    clientID: q.clientID,
    got: q.got,
    deleted: q.deleted,
    rowCount: q.rowCount,
    serverZQL: q.serverZQL,
    hydrateServer: q.hydrateServer,
  })),
});

const metrics = await z.inspector.metrics();
out('metrics', {
  hydrations: metrics['query-materialization-server'].count(),
  updates: metrics['query-update-server'].count(),
});

const analysis = await z.inspector.analyzeQuery(
  z.query.issue.where('open', true).orderBy('id', 'asc'),
);
out('analyze', {value: analysis});

view.destroy();
await z.close();
process.exit(0);
