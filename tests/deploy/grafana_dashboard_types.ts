// The type a dmoe dashboard must have: Grafana's own Dashboard schema
// (@grafana/schema), with each panel's options and field config typed by its
// plugin's schema (timeseries, stat, heatmap) and Prometheus targets.
// check_dashboard.sh appends `const dashboard: DmoeDashboard = <the JSON>;`
// and runs tsc --noEmit --strict: a wrong type, a missing required field or
// an unknown field anywhere fails.
import type { Dashboard, Panel, RowPanel, DataQuery, DataSourceRef } from '@grafana/schema';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';

// JSON holds an enum's values, not the enum: string enums become the union
// of their values, recursively.
type Json<T> = T extends string
  ? `${T}`
  : T extends Array<infer U>
    ? Array<Json<U>>
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

// A Prometheus query as Grafana's Prometheus data source stores it.
interface PrometheusQuery extends DataQuery {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  format?: 'time_series' | 'table' | 'heatmap';
  range?: boolean;
  instant?: boolean;
  interval?: string;
}

// Field config whose `custom` part is exactly the plugin's (the generic
// schema lets any key through there).
type FieldConfigSource = NonNullable<Panel['fieldConfig']>;
type FieldConfigOf<Custom> = Omit<FieldConfigSource, 'defaults'> & {
  defaults: Omit<FieldConfigSource['defaults'], 'custom'> & { custom?: Custom };
};

type TypedPanel<Type extends string, Options, Custom> = Json<
  Omit<Panel, 'type' | 'options' | 'targets' | 'fieldConfig'> & {
    type: Type;
    options: Options;
    fieldConfig: FieldConfigOf<Custom>;
    targets: PrometheusQuery[];
  }
>;

type DmoePanel =
  | TypedPanel<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | TypedPanel<'stat', stat.Options, Record<string, never>>
  | TypedPanel<'heatmap', heatmap.Options, heatmap.FieldConfig>
  | Json<Omit<RowPanel, 'panels'> & { panels: [] }>;

type DmoeDashboard = Json<Omit<Dashboard, 'panels'>> & { panels: DmoePanel[] };
