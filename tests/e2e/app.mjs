// The test app shared by the client (optimistic mutators) and the API server (authoritative
// mutators): one `item` table, custom mutators and the legacy CRUD mutators.
import {
  createSchema,
  table,
  string,
  number,
  defineMutator,
  defineMutators,
} from '@rocicorp/zero';

const item = table('item')
  .columns({id: string(), title: string(), n: number(), owner: string().optional()})
  .primaryKey('id');

export const schema = createSchema({
  tables: [item],
  enableLegacyQueries: true,
  enableLegacyMutators: true,
});

export const mutators = defineMutators({
  item: {
    create: defineMutator(async ({tx, args}) => {
      await tx.mutate.item.insert(args);
    }),
    // Rejected by the server (an application error) when the title is 'reject'.
    setTitle: defineMutator(async ({tx, args}) => {
      if (tx.location === 'server' && args.title === 'reject') {
        throw new Error('title rejected by the server');
      }
      await tx.mutate.item.update({id: args.id, title: args.title});
    }),
  },
});
