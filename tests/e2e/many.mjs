// Runs N unmodified @rocicorp/zero clients (each its own client group, kvStore 'mem') in one
// Node process against a zero-cache. Each materializes the same query as view.mjs. Whenever a
// view changes it prints one JSON line summarizing all of them:
//   {"complete": <views with a complete result>, "distinct": [<distinct complete results>]}
// Usage: node many.mjs <server URL> <N>
// The process runs until it is killed or its stdin closes.
import {Zero} from '@rocicorp/zero';
import {materializeOpenIssues, schema, stopOnStdinEnd} from './issues.mjs';

const server = process.argv[2];
const n = Number(process.argv[3] ?? '1');
if (!server || !(n > 0)) {
  console.error('usage: node many.mjs <server URL> <N>');
  process.exit(2);
}

const latest = new Array(n).fill(null);
const clients = [];
let scheduled = false;
const report = () => {
  scheduled = false;
  const distinct = new Set();
  let complete = 0;
  for (const v of latest) {
    if (v && v.type === 'complete') {
      complete++;
      distinct.add(v.data);
    }
  }
  process.stdout.write(
    JSON.stringify({complete, distinct: [...distinct].map(d => JSON.parse(d))}) + '\n',
  );
};

for (let i = 0; i < n; i++) {
  const z = new Zero({server, schema, userID: `u${i}`, kvStore: 'mem', logLevel: 'error'});
  const view = materializeOpenIssues(z);
  view.addListener((data, resultType) => {
    latest[i] = {type: resultType, data: JSON.stringify(data)};
    if (!scheduled) {
      scheduled = true;
      setTimeout(report, 10);
    }
  });
  clients.push({z, view});
}

const stop = async () => {
  for (const {z, view} of clients) {
    view.destroy();
    await z.close();
  }
};
stopOnStdinEnd(stop);
