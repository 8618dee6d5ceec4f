// Connects the unmodified @rocicorp/zero client to a zero-cache, materializes one query and
// prints the view as a JSON line every time it changes:
//   {"type": "complete" | "unknown", "data": [...]}
// Usage: node view.mjs <server URL>
// The process runs until it is killed or its stdin closes.
import {Zero} from '@rocicorp/zero';
import {materializeOpenIssues, schema, stopOnStdinEnd} from './issues.mjs';

const server = process.argv[2];
if (!server) {
  console.error('usage: node view.mjs <server URL>');
  process.exit(2);
}

const z = new Zero({server, schema, kvStore: 'mem', logLevel: 'error'});
const view = materializeOpenIssues(z);
view.addListener((data, resultType) => {
  process.stdout.write(JSON.stringify({type: resultType, data}) + '\n');
});

const stop = async () => {
  view.destroy();
  await z.close();
};
stopOnStdinEnd(stop);
